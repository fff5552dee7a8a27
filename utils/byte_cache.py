"""A least-recently-used cache bounded by the bytes of what it holds, shared across threads.

Streamlit's own caches are bounded by entry count and copy (unpickle) every value on every
read; results that hold images need a bound in bytes instead, so that a few large photos
cannot fill a shared server. The eviction itself is cachetools' LRUCache, which sizes each
entry with a function of ours.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Callable, Hashable
from typing import TypeVar

import numpy as np
from cachetools import LRUCache
from PIL import Image

Value = TypeVar("Value")


def nbytes(value: object) -> int:
    """Memory that ``value`` holds: pixels of images, buffers of arrays and bytes, summed
    through dataclasses, tuples, lists and dicts; other objects by ``sys.getsizeof``."""
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, bytes | bytearray):
        return len(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, field.name)) for field in dataclasses.fields(value))
    if isinstance(value, list | tuple):
        return sum(nbytes(item) for item in value)
    if isinstance(value, dict):
        return sum(nbytes(item) for item in value.values())
    return sys.getsizeof(value)


class ByteBoundedCache:
    """Values by key, the least recently used dropped once they hold more than ``max_bytes``.

    A value larger than the whole budget is returned but not kept. Values are shared, not
    copied: callers must not modify them (the results here are frozen dataclasses and images
    that nothing draws on in place).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: LRUCache = LRUCache(maxsize=max_bytes, getsizeof=nbytes)
        self._lock = threading.Lock()  # LRUCache itself is not thread-safe

    def get_or_compute(self, key: Hashable, compute: Callable[[], Value]) -> Value:
        with self._lock:
            if key in self._entries:
                return self._entries[key]
        value = compute()  # outside the lock: other sessions' lookups go on meanwhile
        with self._lock:
            if nbytes(value) <= self.max_bytes:
                self._entries[key] = value
        return value

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._entries.currsize
