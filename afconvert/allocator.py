"""Large tensors without page faults: glibc's malloc told to keep freed memory for reuse.

glibc serves an allocation above its mmap threshold with a fresh ``mmap`` and returns it to the system on
free; the threshold adapts upwards, but to 32 MiB at most. Every tensor larger than that (8 maps of
96 x 168 x 168 floats, one resampled activation of EfficientNet-B0: 87 MB) is then zero-filled by the kernel,
page by page, each time it is allocated: on 2 CPU threads that costs about as much as the matrix product that
writes it (docs/performance.md). ``reuse_freed_memory`` raises the mmap and trim thresholds, so freed blocks
stay in the heap and the next tensor of that size reuses them: the process keeps its peak memory instead of
returning it between batches. PyTorch's CPU tuning guide gets the same from jemalloc or TCMalloc
(``LD_PRELOAD``); this needs nothing installed.

The CLI calls it at start (``AFCONVERT_MALLOC=system`` keeps glibc's defaults); a library user calls it once.
It leaves the thresholds alone where the user has set them (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) and does nothing on another C library.
"""
from __future__ import annotations

import ctypes
import os

__all__ = ["reuse_freed_memory", "reusing_freed_memory", "glibc", "ENV"]

ENV = "AFCONVERT_MALLOC"            # "system": keep the C library's own settings
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # mallopt parameters (malloc.h)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_SET = [False]                      # whether this process's thresholds were raised here


def glibc() -> bool:
    """Whether this process runs on glibc (the C library it is linked against, not a guess from the binary)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def reuse_freed_memory(threshold: int = 1 << 30) -> bool:
    """Allocations up to ``threshold`` bytes come from the heap and freed memory stays there (glibc ``mallopt``:
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD). True when set; False where it does not apply (another C library,
    the user's own malloc settings, ``AFCONVERT_MALLOC=system``) or glibc refused."""
    if os.environ.get(ENV, "").lower() == "system" or any(k in os.environ for k in _USER_SETTINGS) or not glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    value = min(int(threshold), 2 ** 31 - 1)
    done = mallopt(_M_MMAP_THRESHOLD, value) == 1 and mallopt(_M_TRIM_THRESHOLD, value) == 1
    _SET[0] = _SET[0] or done
    return done


def reusing_freed_memory() -> bool:
    """Whether ``reuse_freed_memory`` has set this process's thresholds (benchmarks report it)."""
    return _SET[0]
