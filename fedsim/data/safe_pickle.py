"""Restricted unpickling for data files: admit the numpy globals an array needs, nothing else.

``pickle.load`` calls whatever global a file names, so a tampered CIFAR-10 batch could run
arbitrary code. :class:`RestrictedUnpickler` resolves only the names in ``ALLOWED`` (how
numpy 1 and numpy 2 spell array and scalar reconstruction, plus protocol-2 bytes) and raises
:class:`DataFormatError` naming the file and the refused global for anything else. Dicts,
lists, tuples, str, bytes, ints and floats need no global at all.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.errors import DataFormatError

_reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own, whatever its module
_scalar = np.int64(0).__reduce__()[0]
_frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5's out-of-band-capable arrays


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes, limited to that one codec."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


#: (module, name) → the object it resolves to; numpy 1 wrote ``numpy.core``, numpy 2 writes
#: ``numpy._core``, and Python 3 protocol 2 writes bytes as ``_codecs.encode(str, "latin1")``.
ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``ALLOWED`` globals; ``path`` names the file in errors."""

    def __init__(self, file: Any, path: Path, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise DataFormatError(
                f"{self.path}: refused to unpickle global {module}.{name}; a data file may "
                "hold only dicts, lists, bytes, str, numbers and numpy arrays, so this file "
                "is not a plain data batch (it may have been tampered with): replace it with "
                "a fresh copy of the original download"
            ) from None


def load_restricted(path: str | Path, **kwargs: Any) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``kwargs`` as for pickle.load)."""
    path = Path(path)
    with path.open("rb") as fh:
        return RestrictedUnpickler(fh, path, **kwargs).load()
