"""Which clients train and which are held out, as a rule rather than a list of ids.

A federation of ``N`` clients holds ``H`` of them out (they never train; the participation
gap measures them). fedsim keeps only the ``H`` holdout ids, sorted, in one numpy array;
the participating clients are its complement in ``[0, N)``, read by binary search:

- the ``i``-th participating client (the client behind node ``i + 1`` in-process) and
  ``is cid held out`` cost O(log H), with no Python object per client;
- memory is ``8 H`` bytes, so a 10-million-client federation with 1% held out keeps 800 KB.

Two rules choose the holdout set (:data:`HOLDOUT_RULES`):

- ``"permutation"``: the first ``H`` of ``numpy_rng(seed, "holdout").permutation(N)``,
  fedsim's original rule, kept for dataset-backed partitions (digits, mnist5k, CIFAR, LEAF)
  so their runs stay identical; it draws ``N`` numbers once, and a dataset bounds ``N``;
- ``"keyed"``: client ``cid`` is held out when ``pi(cid) < H``, for a keyed pseudo-random
  permutation ``pi`` of ``[0, N)`` (a Feistel network with cycle walking, keyed by the
  seed): a function of ``(seed, cid)`` alone with an exact holdout count, used for
  synthetic populations, which may be of any size.
"""

from __future__ import annotations

import math
import operator
from abc import abstractmethod
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from typing import overload

import numpy as np

from fedsim.rng import numpy_rng

_CHUNK = 1 << 16  # ids converted to Python ints at a time while iterating
FEISTEL_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's multipliers: a cheap, well-mixed hash
_M2 = np.uint64(0x94D049BB133111EB)


class ClientIds(Sequence[int]):
    """A sorted sequence of distinct client ids behind a numpy-backed rule.

    Items are Python ints; ``in``, :meth:`index` and indexing cost O(log N) at most.
    ``np.asarray(ids)`` gives the ids as an int64 array (one vectorized step), and a
    ``ClientIds`` equals any sequence with the same ids in the same order (``holdout ==
    ()`` reads as before, when these were tuples).
    """

    ascending = True  # sorted by client id: what the in-process grid's node order needs

    @abstractmethod
    def __len__(self) -> int:
        """How many ids."""

    @abstractmethod
    def _at(self, i: np.ndarray) -> np.ndarray:
        """The ids at valid positions ``i`` (int64 array)."""

    @abstractmethod
    def _one(self, i: int) -> int:
        """The id at valid position ``i``, without numpy (a scalar numpy call costs ~10x)."""

    @abstractmethod
    def _rank(self, cid: int) -> int | None:
        """The position of ``cid``, or None when it is not in the sequence."""

    @overload
    def __getitem__(self, i: int) -> int: ...

    @overload
    def __getitem__(self, i: slice) -> list[int]: ...

    def __getitem__(self, i):
        n = len(self)
        if isinstance(i, slice):
            return self._at(np.arange(n, dtype=np.int64)[i]).tolist()
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"position {i} is outside 0..{n - 1}")
        return self._one(i)

    def __iter__(self) -> Iterator[int]:
        n = len(self)
        for start in range(0, n, _CHUNK):
            yield from self._at(np.arange(start, min(n, start + _CHUNK), dtype=np.int64)
                                ).tolist()

    def __contains__(self, cid: object) -> bool:
        try:
            return self._rank(int(cid)) is not None  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    def index(self, cid: int, start: int = 0, stop: int | None = None) -> int:
        """The position of client ``cid`` (``ValueError`` when it is not here)."""
        pos = self._rank(int(cid))
        if pos is None or pos < start or (stop is not None and pos >= stop):
            raise ValueError(f"client {cid} is not in this sequence")
        return pos

    def count(self, cid: int) -> int:
        return int(cid in self)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._at(np.arange(len(self), dtype=np.int64))
        return out if dtype is None else out.astype(dtype)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        if len(other) != len(self):
            return False
        return bool(np.array_equal(np.asarray(self), np.asarray(other, dtype=np.int64)))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(map(str, self[:6]))
        return f"{type(self).__name__}([{head}{', ...' if len(self) > 6 else ''}], n={len(self)})"


class SortedIds(ClientIds):
    """Explicit ids: a sorted int64 array of distinct client ids (the holdout clients)."""

    def __init__(self, ids: np.ndarray) -> None:
        ids = np.array(ids, dtype=np.int64)  # a private copy, frozen below
        if ids.ndim != 1 or (len(ids) > 1 and not np.all(ids[1:] > ids[:-1])):
            raise ValueError("error: SortedIds needs a 1-d array of increasing client ids")
        ids.flags.writeable = False
        self.ids = ids
        self._ids = array("q", ids.tobytes())  # the same ids for bisect (Python-level reads)

    def __len__(self) -> int:
        return len(self._ids)

    def _at(self, i: np.ndarray) -> np.ndarray:
        return self.ids[i]

    def _one(self, i: int) -> int:
        return self._ids[i]

    def _rank(self, cid: int) -> int | None:
        pos = bisect_left(self._ids, cid)
        return pos if pos < len(self._ids) and self._ids[pos] == cid else None


class Complement(ClientIds):
    """``[0, n)`` without the ids of a :class:`SortedIds` (the participating clients).

    The ``i``-th id is ``i + j``, where ``j`` counts the excluded ids ``e[k]`` with
    ``e[k] - k <= i`` (``e[k] - k`` is how many kept ids lie below ``e[k]``).
    """

    def __init__(self, n: int, excluded: SortedIds) -> None:
        if len(excluded) and not (excluded.ids[0] >= 0 and excluded.ids[-1] < n):
            raise ValueError(f"error: excluded client ids must lie in 0..{n - 1}")
        self.n = int(n)
        self.excluded = excluded
        self._gaps = excluded.ids - np.arange(len(excluded), dtype=np.int64)
        self._gaps_q = array("q", self._gaps.tobytes())
        self._len = self.n - len(excluded)

    def __len__(self) -> int:
        return self._len

    def _at(self, i: np.ndarray) -> np.ndarray:
        return i + np.searchsorted(self._gaps, i, side="right")

    def _one(self, i: int) -> int:
        return i + bisect_right(self._gaps_q, i)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        keep = np.ones(self.n, dtype=bool)  # one mask beats a binary search per id
        keep[self.excluded.ids] = False
        out = np.flatnonzero(keep).astype(np.int64, copy=False)
        return out if dtype is None else out.astype(dtype)

    def _rank(self, cid: int) -> int | None:
        if not 0 <= cid < self.n or cid in self.excluded:
            return None
        return cid - bisect_left(self.excluded._ids, cid)


class Population:
    """``num_clients`` clients, ``holdout`` of them held out, the rest ``participating``.

    ``participating[i]`` is the client behind the ``i``-th node (partition id ``i``); both
    sequences are sorted by client id.
    """

    def __init__(self, num_clients: int, holdout: np.ndarray) -> None:
        self.num_clients = int(num_clients)
        self.holdout = SortedIds(np.sort(np.asarray(holdout, dtype=np.int64)))
        self.participating = Complement(self.num_clients, self.holdout)

    def is_holdout(self, cid: int) -> bool:
        """Whether client ``cid`` never trains (O(log H))."""
        return cid in self.holdout


# ------------------------------------------------------------------ holdout rules

def permutation_holdout(seed: int, num_clients: int, num_holdout: int) -> np.ndarray:
    """fedsim's original rule: the first ``num_holdout`` of a seeded permutation (O(N))."""
    return numpy_rng(seed, "holdout").permutation(num_clients)[:num_holdout]


def keyed_holdout(seed: int, num_clients: int, num_holdout: int) -> np.ndarray:
    """The clients ``cid`` with ``pi(cid) < num_holdout``, for :class:`KeyedPermutation`
    ``pi``: O(H) work, however large the population."""
    if num_holdout == 0:
        return np.zeros(0, dtype=np.int64)
    pi = KeyedPermutation(seed, num_clients)
    return pi.inverse(np.arange(num_holdout, dtype=np.int64))


#: holdout rule name -> ``(seed, num_clients, num_holdout) -> held-out ids``
HOLDOUT_RULES: dict[str, Callable[[int, int, int], np.ndarray]] = {
    "permutation": permutation_holdout,
    "keyed": keyed_holdout,
}


def make_population(rule: str, seed: int, num_clients: int, num_holdout: int) -> Population:
    """The population of ``num_clients`` with ``num_holdout`` held out by ``rule``."""
    if rule not in HOLDOUT_RULES:
        raise ValueError(f"error: unknown holdout rule {rule!r}; use one of "
                         + ", ".join(HOLDOUT_RULES))
    if not 0 <= num_holdout <= num_clients:
        raise ValueError(f"error: {num_holdout} holdout clients of {num_clients}; it must be "
                         "between 0 and the number of clients")
    return Population(num_clients, HOLDOUT_RULES[rule](seed, num_clients, num_holdout))


class KeyedPermutation:
    """A pseudo-random permutation of ``[0, n)`` keyed by ``seed``, evaluated per element.

    A balanced Feistel network on ``2k``-bit words (the smallest even width covering ``n``,
    so the domain is under ``4 n``) is a bijection whatever its round function; cycle
    walking (re-encrypting while the value is ``>= n``) restricts it to ``[0, n)``, still a
    bijection (Black & Rogaway, "Ciphers with arbitrary finite domains", CT-RSA 2002). The
    round function is a splitmix64-style hash of the half-word and a seeded round key. Only
    the 'which clients are held out' decision depends on it; it need not be cryptographic.
    """

    def __init__(self, seed: int, n: int) -> None:
        if n < 1:
            raise ValueError(f"error: a permutation of {n} elements; it needs at least one")
        self.n = int(n)
        self.half = max(1, math.ceil(math.log2(n) / 2)) if n > 1 else 1
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = numpy_rng(seed, "holdout", "feistel").integers(
            0, 2**63, size=FEISTEL_ROUNDS, dtype=np.uint64)

    def _f(self, r: np.ndarray, key: np.uint64) -> np.ndarray:
        x = (r + key) * _M1
        x ^= x >> np.uint64(31)
        x *= _M2
        x ^= x >> np.uint64(29)
        return x & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        s = np.uint64(self.half)
        left, right = x >> s, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._f(right, key)
        return (left << s) | right

    def _decrypt(self, y: np.ndarray) -> np.ndarray:
        s = np.uint64(self.half)
        left, right = y >> s, y & self.mask
        for key in self.keys[::-1]:
            left, right = right ^ self._f(left, key), left
        return (left << s) | right

    def _walk(self, values: np.ndarray, step: Callable[[np.ndarray], np.ndarray]
              ) -> np.ndarray:
        values = np.asarray(values, dtype=np.int64)
        if len(values) and (values.min() < 0 or values.max() >= self.n):
            raise ValueError(f"error: permutation inputs must lie in 0..{self.n - 1}")
        out = step(values.astype(np.uint64))
        todo = np.flatnonzero(out >= np.uint64(self.n))
        while len(todo):  # cycle walking: each value leaves [n, 4n) within a few steps
            out[todo] = step(out[todo])
            todo = todo[out[todo] >= np.uint64(self.n)]
        return out.astype(np.int64)

    def __call__(self, cid: np.ndarray) -> np.ndarray:
        """``pi(cid)`` for each id (int64 array in, int64 array out)."""
        return self._walk(cid, self._encrypt)

    def inverse(self, rank: np.ndarray) -> np.ndarray:
        """``pi^-1(rank)`` for each rank."""
        return self._walk(rank, self._decrypt)
