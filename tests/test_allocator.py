"""The engine keeps freed memory for its next steps (geodesic/allocator.py) instead of faulting it in again."""
import ctypes.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from geodesic.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
GLIBC = ctypes.util.find_library("c") is not None and hasattr(ctypes.CDLL(ctypes.util.find_library("c")),
                                                               "gnu_get_libc_version")

# A step's pattern: sixteen 1 MB blocks alive at once, all freed, again and again. Page faults per round, in a
# fresh process (malloc's thresholds adapt to what a process has done, so the test process is no clean slate).
_ROUNDS = textwrap.dedent("""
    import ctypes, resource, sys
    sys.path.insert(0, sys.argv[2])
    if sys.argv[1] != "0":
        from geodesic.allocator import keep_freed_memory
        assert keep_freed_memory(int(sys.argv[1]))
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def one_round():
        blocks = [libc.malloc(1 << 20) for _ in range(16)]
        for b in blocks:
            ctypes.memset(b, 1, 1 << 20)
        for b in blocks:
            libc.free(b)
    one_round(); one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        one_round()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def _faults_per_round(megabytes: int) -> float:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, str(megabytes), str(ROOT)], capture_output=True, text=True,
                         timeout=60, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="mallopt's settings are glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    as_it_comes = _faults_per_round(0)
    kept = _faults_per_round(256)
    assert as_it_comes > 2000  # 16 MB handed back and touched again: ~4,000 faults of 4 kB a round
    assert kept < as_it_comes / 20


def test_bad_sizes_are_refused_and_zero_changes_nothing():
    assert keep_freed_memory(0) is False
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ValueError, match="megabytes"):
            keep_freed_memory(bad)
