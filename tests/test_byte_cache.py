"""ByteBoundedCache: bounded by bytes, least recently used out first, shared across threads."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from utils.byte_cache import ByteBoundedCache, nbytes

MB = 1 << 20


@dataclass(frozen=True)
class Result:
    image: Image.Image
    mask: Image.Image
    changes: np.ndarray


def test_nbytes_counts_pixels_and_buffers_through_containers():
    result = Result(Image.new("RGB", (100, 50)), Image.new("L", (100, 50)), np.zeros(10, np.float32))
    assert nbytes(result) == 100 * 50 * 3 + 100 * 50 + 40
    assert nbytes([b"abc", {"x": np.zeros(4, np.uint8)}]) == 7


def test_images_are_evicted_by_bytes_least_recently_used_first():
    cache = ByteBoundedCache(max_bytes=10 * MB)
    computed = []

    def image_of(key):
        computed.append(key)
        return Image.new("RGB", (1024, 1024))  # 3 MB

    for key in "abc":
        cache.get_or_compute(key, lambda key=key: image_of(key))
    cache.get_or_compute("a", lambda: image_of("a"))  # a hit: "a" becomes the most recent
    cache.get_or_compute("d", lambda: image_of("d"))  # 12 MB would not fit: "b" goes
    assert computed == ["a", "b", "c", "d"]
    assert cache.held_bytes == 9 * MB
    cache.get_or_compute("a", lambda: image_of("a"))
    cache.get_or_compute("b", lambda: image_of("b"))
    assert computed == ["a", "b", "c", "d", "b"]


def test_a_value_larger_than_the_budget_is_returned_but_not_kept():
    cache = ByteBoundedCache(max_bytes=1 * MB)
    value = cache.get_or_compute("big", lambda: Image.new("RGB", (1024, 1024)))
    assert value.size == (1024, 1024) and cache.held_bytes == 0


def test_threads_share_one_cache_safely():
    cache = ByteBoundedCache(max_bytes=64 * MB)
    results = {}

    def work(index):
        results[index] = [cache.get_or_compute(key % 7, lambda key=key: np.full(1000, key % 7)) for key in range(200)]

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for values in results.values():
        assert all(int(value[0]) == key % 7 for key, value in enumerate(values))
    assert cache.held_bytes == 7 * 8000
