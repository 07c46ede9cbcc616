"""Process-level settings that make numpy training steps faster on Linux: memory, and BLAS threads.

Each training step allocates and frees ~100 MB of temporaries. By default glibc returns freed
memory to the OS at once and then page-faults it back in on the next step: 13k-30k page faults
and 60-80 ms of system time per step on a 2-core machine. Raising both the mmap threshold and the
trim threshold keeps that memory in the process. Measured on a 2-core machine (Python 3.11,
numpy 2.4, OpenBLAS with 2 threads) at nanoGPT's CPU recipe size: steps 1.3-1.7x faster.
Raising only the trim threshold made it worse. The same settings can be made without code by
setting the environment variables MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ before the
process starts.
"""

import contextlib
import ctypes
import ctypes.util
import functools
import os

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


# ----------------------------------------------------------------------------- BLAS threads
#
# numpy hands its matrix products to a BLAS library; the wheels on PyPI bundle OpenBLAS, which
# runs each product on every core. The fast training path (tinyllm/fast.py) can instead run two
# halves of a batch at once, one per core; while it does, OpenBLAS must keep each product to
# one thread, or the two halves and OpenBLAS's own threads fight over the same two cores.
# OpenBLAS's thread count is one setting for the whole process, read and written by
# `openblas_get_num_threads` and `openblas_set_num_threads`; the copies bundled with numpy
# carry a prefix and a suffix on those names (scipy_openblas_set_num_threads64_). numpy
# offers no call for them, so they are looked up in the OpenBLAS that numpy loaded (named in
# /proc/self/maps on Linux). Where there is no such library (macOS's Accelerate, MKL),
# `blas_threads` returns None and the fast path runs the halves one after the other.

_PREFIXES = ("openblas_", "scipy_openblas_")
_SUFFIXES = ("", "64_", "_64_")


@functools.lru_cache(maxsize=None)
def blas_threads():
    """(get(), set(n)) for the thread count of the OpenBLAS numpy uses, or None."""
    import numpy  # noqa: F401  (loads the BLAS library, so that the process map names it)

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = sorted({line.split()[-1] for line in maps
                            if "openblas" in os.path.basename(line.split()[-1]).lower()})
    except OSError:  # not Linux
        return None
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in _PREFIXES:
            for suffix in _SUFFIXES:
                get = getattr(library, f"{prefix}get_num_threads{suffix}", None)
                set_ = getattr(library, f"{prefix}set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.argtypes, get.restype = [], ctypes.c_int
                    set_.argtypes, set_.restype = [ctypes.c_int], None
                    return get, set_
    return None


@contextlib.contextmanager
def one_blas_thread():
    """Within the block, matrix products use one thread (the whole process); afterwards the
    count is what it was. A no-op where `blas_threads()` is None."""
    threads = blas_threads()
    if threads is None:
        yield
        return
    get, set_ = threads
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)
