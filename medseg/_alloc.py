"""Allocator tuning for the large, short-lived arrays of a CT run (Linux, glibc only).

By default glibc hands every freed block above its mmap threshold back to the kernel at
once and trims the heap top early, so each new slab, probability map or mask of a study is
fresh memory the kernel must zero page by page. A fixed 64 MiB mmap threshold and a
512 MiB trim threshold keep the smaller arrays' memory in the process for the next one,
while arrays of a whole 512 x 512 volume (74 MiB and up) stay mmap'ed, so they cannot
fragment the heap. Measured with ``benchmarks/allocator.py`` on chest-ct-philips-141 (the
whole ``medseg segment`` job, warm, 2-core VM): median 4.67 s -> 4.40 s, minor page faults
89 k -> 11 k per study, peak RSS 1.26 -> 1.30 GiB (docs/benchmarks.md). A 1 GiB mmap
threshold was no faster.

:func:`tune` is called by the ``medseg`` command and by batch workers, never on import of
the library (an embedding application keeps its own allocator settings).

:func:`freeze_heap` is the same kind of process setting for Python's cyclic garbage
collector: torch and MONAI leave about half a million objects, and each full collection
walks all of them again (a generation-2 collection took up to 0.17 s; 0.55 s of a
``medseg segment`` command on chest-ct-philips-141, 0.19 s per study in a warm worker), as
does the interpreter's exit (0.9 s). ``gc.freeze()`` moves the objects alive at that moment
to the collector's permanent generation: they are still freed by reference counting, only
no longer walked. The command calls it once the model is loaded and again when its work is
done; a batch worker once its model is loaded (before any of its studies' data exist, so no
study's garbage is kept). Measured with ``benchmarks/stage_times.py`` and
``/usr/bin/time medseg segment`` (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

__all__ = ["freeze_heap", "tune"]

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap and are reused; larger ones are mmap'ed.
MMAP_THRESHOLD = 64 << 20
#: Free memory at the top of the heap kept for reuse instead of trimmed.
TRIM_THRESHOLD = 512 << 20
#: Extra heap requested per growth, so a run of allocations grows the heap a few times only.
TOP_PAD = 64 << 20

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


def freeze_heap() -> None:
    """Move every object alive now out of the cyclic garbage collector's generations
    (``gc.freeze``): later collections and the interpreter's exit no longer walk the
    imported libraries and the loaded model. Objects frozen are still freed by reference
    counting; only a reference cycle among them that dies later is never collected, so call
    it when what is alive is meant to live (the model loaded, the work done)."""
    gc.freeze()
