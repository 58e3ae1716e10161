"""Allocator tuning for the large, short-lived arrays of a CT run (Linux, glibc only).

glibc returns every freed block above its mmap threshold (at most 32 MiB, adjusted at run
time) to the kernel at once, so each new slab, probability map or mask of a study is fresh
memory the kernel must zero page by page. On the 2-core VM this project is measured on,
those page faults cost about a second of system time per 141-slice study. Raising the mmap
and trim thresholds keeps freed memory in the process for the next array: measured on
chest-ct-philips-141, ``medseg segment`` (warm) went from 5.6-6.7 s to 4.1-4.8 s, minor page
faults from ~180 k to ~55 k per study, peak RSS unchanged (1.42 vs 1.42 GB); see
docs/benchmarks.md. Memory freed stays reserved until the process ends (the peak is the
same), which suits a command or a batch worker; :func:`tune` is called by the ``medseg``
command and by batch workers, never on import of the library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune"]

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap and are reused; only larger ones are mmap'ed.
MMAP_THRESHOLD = 1 << 30
#: Free memory at the top of the heap kept for reuse instead of trimmed.
TRIM_THRESHOLD = 1 << 30
#: Extra heap requested per growth, so a run of allocations grows the heap a few times only.
TOP_PAD = 256 << 20

_done = False


def tune() -> bool:
    """Apply the thresholds once per process; True if glibc accepted them (False on other
    platforms or C libraries, where nothing changes)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD)))
    _done = ok
    return ok
