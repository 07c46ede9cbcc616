"""Process-level settings that make numpy training steps faster on Linux.

Each training step allocates and frees ~100 MB of temporaries. By default glibc returns freed
memory to the OS at once and then page-faults it back in on the next step: 13k-30k page faults
and 60-80 ms of system time per step on a 2-core machine. Raising both the mmap threshold and the
trim threshold keeps that memory in the process. Measured on a 2-core machine (Python 3.11,
numpy 2.4, OpenBLAS with 2 threads) at nanoGPT's CPU recipe size: steps 1.3-1.7x faster.
Raising only the trim threshold made it worse. The same settings can be made without code by
setting the environment variables MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ before the
process starts.
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold=32 << 20, trim_threshold=1 << 30):
    """Keep freed memory in the process (glibc only); returns True if the settings took effect."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )
