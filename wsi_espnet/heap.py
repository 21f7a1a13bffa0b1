"""Keep the C heap flat as slides grow: buffers of 1 MiB and more are mapped and unmapped, never pooled.

glibc raises its mmap threshold each time a large mapped block is freed, up to 32 MiB, so after the
first windows every 11.6 MB window (and its float copies) came from the thread arenas, which fragment
and keep growing with the number of windows: peak RSS rose 10% from a 20k to a 40k slide. Fixing the
threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the adjustment off) returns each large
buffer to the system when it is freed. Done once per process, where slides are read and models run;
a no-op outside glibc.
"""

from __future__ import annotations

import ctypes
import threading

__all__ = ["MMAP_THRESHOLD", "keep_heap_flat"]

#: Bytes from which glibc maps allocations instead of carving them from an arena.
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_state: dict[str, bool] = {}
_lock = threading.Lock()


def keep_heap_flat() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`; True when it is in effect (glibc only)."""
    with _lock:
        if "applied" not in _state:
            try:
                _state["applied"] = bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
            except (OSError, AttributeError):  # not glibc: macOS, musl, Windows
                _state["applied"] = False
        return _state["applied"]
