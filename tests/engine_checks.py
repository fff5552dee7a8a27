"""Checks every explainer family's tests run the same way: one shared model, many threads; the
projector map computed by hand."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn


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


def assert_projector_map_is_gradient_x_input(
    explainer, language_model: nn.Module, image, caption, word_index: int, tokens_to_patches
):
    """The "projector" map computed by hand, independently of the module the explainer hooks:
    the embeddings the language model receives made a leaf, the word's log p (position t - 1
    scores id t) differentiated with respect to them, times them, summed over channels, its
    positive part at the image-token positions (in sequence order), then ``tokens_to_patches``
    (the family's token-to-patch map, checked against the model by the family's own tests)."""
    (maps,) = explainer.explain(image, caption, word_indices=[word_index], method="projector")
    received = []

    def make_leaf(module, args, kwargs):
        leaf = kwargs["inputs_embeds"].detach().requires_grad_(True)
        received.append(leaf)
        return args, {**kwargs, "inputs_embeds": leaf}

    ids = torch.tensor([caption.token_ids])
    handle = language_model.register_forward_pre_hook(make_leaf, with_kwargs=True)
    try:
        with torch.enable_grad():
            logits = explainer.teacher_forced_logits(explainer.model_inputs([image]), ids)
    finally:
        handle.remove()
    log_p = logits[0].float().log_softmax(-1)
    word = caption.words[word_index]
    score = sum(log_p[position - 1, caption.token_ids[position]] for position in range(word.start, word.end))
    (embeddings,) = received
    (gradient,) = torch.autograd.grad(score, embeddings)
    per_token = (gradient * embeddings).sum(-1).clamp(min=0)[0, ids[0] == explainer.image_token_id]
    expected = tokens_to_patches(per_token.detach())
    assert maps.layer_names == ("projector output",)
    np.testing.assert_allclose(maps.cam_patches[0], np.asarray(expected), rtol=1e-4, atol=1e-7)
    assert maps.cam_patches[0].max() > 0, "a blank map would prove nothing"
