"""Host memory that is freed goes back to the operating system.

glibc's malloc serves a request of at least M_MMAP_THRESHOLD bytes with its own mmap, returned to the system on
free; smaller ones come from the heap, which keeps freed blocks for reuse. The threshold starts at 128 KiB but
rises to the size of every mmapped block freed (up to 32 MiB), so after the first steps of training most weight-,
gradient- and temporary-sized tensors (MiBs each) land on the heap, and a rank's resident memory keeps the high
tide of every temporary it ever freed: measured on a ~110M-parameter model with TP 2 x PP 2 on CPU, about
+0.1 x (weights + gradients + Adam) per rank during training and more after a save (bench/RESULTS.md). Fixing
the threshold at its initial value stops the drift; the cost is one mmap / munmap per large allocation.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_MMAP_THRESHOLD = -3           # mallopt parameter numbers from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024


def release_freed_memory() -> bool:
    """Fix glibc's mmap threshold (process-wide; call before the model is built). Leaves a threshold set through
    the environment (``MALLOC_MMAP_THRESHOLD_``) alone, and does nothing where the C library is not glibc.
    Returns True when the threshold was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
