"""Give a long-lived worker's freed memory back to the operating system between trials.

A Ray worker reused across trials (`reuse_actors`) frees each trial's models, optimizer state, batches and
checkpoint buffers, but glibc's allocator keeps most freed pages mapped for reuse, and trials of other
tasks and methods ask for other sizes: measured on the CR-ILD CPU study, a reused worker's anonymous memory
grew ~0.45 GB per trial until Ray's memory monitor killed it. `malloc_trim(0)` returns the free pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache


@lru_cache(maxsize=1)
def _libc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> bool:
    """Collect the trial's garbage, then hand free heap pages back to the OS; True if the C library could trim.

    What survives the collection is the worker's long-lived state (imported modules, caches: ~0.5M objects
    with torch, transformers and mlflow loaded): `gc.freeze` moves it out of the collector's sight, so the next
    trial's collection scans only that trial's objects (measured: 0.28 s -> 0.007 s a collection)."""
    gc.collect()
    gc.freeze()
    trim = _libc_trim()
    if trim is None:
        return False
    trim(0)
    return True
