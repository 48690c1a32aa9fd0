"""Keep freed multi-megabyte buffers in the controller process for reuse instead of unmapping them.

Every pushed update arrives in a fresh buffer that libzmq's I/O thread allocates and the controller frees
once it is done with it. glibc hands buffers above its mmap threshold back to the kernel when they are
freed, and trims the top of a heap once the free space there passes its trim threshold; the next update's
buffer then faults the same pages back in, zero-filled, one 4 KiB page at a time. In
``benchmarks/wire.py``'s controller path (session 11) that was 113-140 page faults per 4 MB update; with
:func:`retain_freed_buffers` it was 0-17, and that path without its finiteness check went from 0.85 and
0.77 of raw ZeroMQ to 1.06 and 0.99 (two runs each, alternating).

The cost: memory freed after a peak (a burst of pushes, a checkpoint) stays in the process, up to the trim
threshold, instead of going back to the system. Symptom → setting: if the controller's resident memory stays
higher after bursts than its host can spare, set ``MALLOC_TRIM_THRESHOLD_`` (bytes) in its environment;
when it or ``MALLOC_MMAP_THRESHOLD_`` is set, this module leaves glibc's settings alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "retain_freed_buffers"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): anything larger is
# rejected. Allocations above it (a whole model's checkpoint) are still mapped and unmapped each time.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def retain_freed_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; ``True`` when they were set.

    Does nothing (``False``) on a C library without ``mallopt`` (musl, macOS) or when the environment
    already sets either threshold.
    """
    if any(name in os.environ for name in _ENVIRONMENT):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success and 0 on error.
    ok = (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )
    if not ok:
        log.debug("mallopt refused the thresholds; freed buffers go back to the kernel as before")
    return ok
