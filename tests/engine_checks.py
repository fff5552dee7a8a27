"""Checks every explainer family's tests run the same way: one shared model, many threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def assert_threads_get_what_they_get_alone(
    explainer, caption, jobs, repeats: int = 3, score_atol: float = 0.0, rtol: float = 0.0, atol: float = 0.0
):
    """``jobs`` of (image, word index, method) explained at once from one thread each, each
    ``repeats`` times, give what each gives alone (bit-equal with the default tolerances)."""
    alone = [explainer.explain(image, caption, [word], method)[0] for image, word, method in jobs]
    barrier = threading.Barrier(len(jobs))

    def work(index: int) -> list:
        image, word, method = jobs[index]
        barrier.wait()  # start together so the forward passes really overlap
        return [explainer.explain(image, caption, [word], method)[0] for _ in range(repeats)]

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(work, range(len(jobs))))  # re-raises any thread's exception
    for expected, got_all in zip(alone, results, strict=True):
        assert len(got_all) == repeats
        for got in got_all:
            assert abs(got.score - expected.score) <= score_atol
            np.testing.assert_allclose(got.cam_patches, expected.cam_patches, rtol=rtol, atol=atol)
