"""Keep the memory that steps free for the next step, instead of handing it back to the system and faulting it in again.

A batched step allocates tensors of a megabyte or more (8 walks' activations on 360 test inputs: 8 × 360 × 128
floats) and frees them a few microseconds later. glibc's malloc serves blocks that large with a fresh `mmap` and
returns them with `munmap` (its threshold starts at 128 kB and only grows when such a block is freed), so the
next step pays a page fault per 4 kB page to touch them again. Measured on this project's 2-core machine, 8
penalty walks of the default set-up as one `WalkBatch` on one thread: 2,300 page faults and about 4 ms of a 21 ms
batch step (`bench/batch_profile.py --keep-freed-mb 0` against the default, BENCHMARKS.md). Setting malloc's mmap
threshold to its 32 MB ceiling and raising its trim threshold keeps such blocks in the heap: the process keeps
its peak working set (what it already reached) instead of returning and refaulting it.

Why not jemalloc or tcmalloc, which PyTorch's CPU tuning guide suggests: they are swapped in with LD_PRELOAD before
the process starts, which neither `streamlit run` nor a Python user of the engine controls, and they are system
packages. `mallopt` is two calls on the C library already loaded. Elsewhere than glibc (macOS, musl) this does
nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)

DEFAULT_KEEP_FREED_MB = 1024  # the engine's and the command line's setting (EngineSettings.keep_freed_mb)

_lock = threading.Lock()
_applied: int | None = None


def _glibc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # only glibc has both
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory(megabytes: int) -> bool:
    """Let this process keep up to `megabytes` of freed memory for reuse (glibc's M_TRIM_THRESHOLD) and serve
    blocks up to 32 MB from its heap (M_MMAP_THRESHOLD). Process-wide and idempotent; 0 leaves malloc as it is.
    Returns whether the setting is in force (False where the C library is not glibc)."""
    global _applied
    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or megabytes < 0:
        raise ValueError(f"megabytes: got {megabytes!r}; allowed: an integer >= 0")
    if megabytes == 0:
        return False
    with _lock:  # sessions' threads may start engines at once; mallopt itself takes malloc's own lock
        if _applied == megabytes:
            return True
        libc = _glibc()
        if libc is None:
            return False
        trim = min(megabytes << 20, 2**31 - 1)  # an int in C
        ok = libc.mallopt(_M_MMAP_THRESHOLD, min(_MMAP_THRESHOLD_MAX, trim)) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1 and ok
        _applied = megabytes if ok else None
        return ok
