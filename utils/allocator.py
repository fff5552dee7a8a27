"""Give freed image buffers back to the operating system.

glibc's malloc serves buffers below its mmap threshold from heaps it keeps, and raises that
threshold (up to 32 MB) each time a large buffer is freed, so after a few large photos the
server would hold on to hundreds of megabytes it no longer uses. A fixed 1 MB threshold keeps
every image-sized buffer in its own mapping, returned when freed; two arenas stop each
session thread from growing a heap of its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_ARENA_MAX = -8  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
ARENAS = 2


@functools.cache
def return_large_buffers() -> bool:
    """Set the thresholds above, once per process (they are process-wide, and finding libc
    runs ldconfig); True when they were set (glibc), False elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # musl, macOS: no mallopt, and nothing to tune this way
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(libc.mallopt(M_ARENA_MAX, ARENAS))
