"""Memory settings of a pair-building process.

Building a pair allocates and frees a few megabytes of image-sized arrays (decoded JPEGs,
resized images, the float32 planes of the Poisson solve). By default glibc's malloc gives large
freed blocks back to the kernel (fresh ``mmap`` for big blocks, heap trimmed once twice the
mmap threshold is free), so the next pair page-faults the same amount back in, zero-filled,
a noticeable share of a pair's time (``benchmarks/bench_build.py`` measures it). Keeping freed
memory for reuse costs no more than the builder's peak memory, and changes no result.
"""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 16 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Ask glibc's malloc to serve blocks under ``mmap_threshold`` bytes from its heap and to keep
    up to ``trim_threshold`` bytes of freed heap for reuse, for the whole process. Returns
    whether both settings were applied (False where the C library is not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
