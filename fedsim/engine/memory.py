"""Freed memory kept for reuse (glibc): fewer page faults for a cohort's large tensors.

PyTorch's CPU tensors come from ``malloc``. glibc starts with a 128 KiB mmap threshold and
trim threshold: larger blocks are unmapped as soon as they are freed, and free memory at the
top of the heap is handed back, so the next tensor of that size page-faults on every 4 KiB
page it touches. glibc raises both thresholds by itself as it frees large blocks, but only
to the largest block seen (trim: twice that), and a vectorized cohort's activations of a
few MB each still cycle in and out. :func:`reused_memory` sets them at once to where glibc's
own adjusting ends (mmap threshold at its 64-bit maximum of 32 MiB, trim threshold twice
that) with ``mallopt`` (the effect on a cohort is measured in benchmarks/RESULTS.md,
"Memory reuse"). Setting a threshold ends glibc's adjusting for the rest of
the process, so these stay after the run (they are where it would have ended up); free
memory is returned at the end of the run (``malloc_trim``). Other C libraries: nothing to
do. Child processes (Ray's local workers) get the same settings through :data:`MALLOC_ENV`,
which glibc reads at start-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import platform
from collections.abc import Iterator

log = logging.getLogger("fedsim")

#: ``mallopt`` parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MIB = 2**20
#: the largest mmap threshold glibc accepts on 64-bit systems, and twice that for trimming
SETTINGS = {M_MMAP_THRESHOLD: 32 * MIB, M_TRIM_THRESHOLD: 64 * MIB}
#: the same settings for child processes, as glibc's environment variables
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(SETTINGS[M_MMAP_THRESHOLD]),
              "MALLOC_TRIM_THRESHOLD_": str(SETTINGS[M_TRIM_THRESHOLD])}


def glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc with ``mallopt``, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def reused_memory(enabled: bool = True, libc: ctypes.CDLL | None = None) -> Iterator[bool]:
    """:data:`SETTINGS` for a run (``enabled`` and glibc), free memory returned after it;
    yields whether glibc took them. ``libc``: the library to configure (default:
    :func:`glibc`)."""
    libc = (libc or glibc()) if enabled else None
    if libc is None:
        yield False
        return
    refused = [param for param, value in SETTINGS.items() if libc.mallopt(param, value) != 1]
    if refused:
        log.debug("mallopt refused parameter(s) %s", refused)
    try:
        yield len(refused) < len(SETTINGS)
    finally:
        libc.malloc_trim(0)


@contextlib.contextmanager
def child_environment(enabled: bool, environ: dict[str, str]) -> Iterator[None]:
    """:data:`MALLOC_ENV` in ``environ`` (e.g. ``os.environ`` while Ray starts its workers)
    where not already set, removed again afterwards."""
    added = [k for k in MALLOC_ENV if enabled and k not in environ]
    for key in added:
        environ[key] = MALLOC_ENV[key]
    try:
        yield
    finally:
        for key in added:
            environ.pop(key, None)
