"""Checks every explainer family's tests run the same way: one shared model, many threads; the
projector map computed by hand."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
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


def count_forward_hooks(model) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def assert_no_hook_is_left_after_an_error(explainer, caption, image, methods, failing_part, failing_methods) -> None:
    """Every method explained once (transformers installs its own capture hooks once, lazily),
    then ``failing_part``'s forward made to raise after the parts before it ran (their hooks
    fired): each of ``failing_methods`` raises, and the model keeps the hooks it had.

    Args:
        failing_part: a submodule that runs after the captured modules of ``failing_methods``
            have started to capture (a language model, a decoder).
    """
    for method in methods:
        explainer.explain(image, caption, word_indices=[0], method=method)
    hooks_before = count_forward_hooks(explainer.model)

    def broken_forward(*args, **kwargs):
        raise RuntimeError("part failed")

    original_forward = failing_part.forward
    failing_part.forward = broken_forward
    try:
        for method in failing_methods:
            with pytest.raises(RuntimeError, match="part failed"):
                explainer.explain(image, caption, method=method)
    finally:
        failing_part.forward = original_forward
    assert count_forward_hooks(explainer.model) == hooks_before


def assert_parameters_get_no_gradient(explainer, caption, image, methods) -> None:
    """Explaining with every method writes no ``.grad`` into the shared, frozen parameters."""
    for method in methods:
        explainer.explain(image, caption, method=method)
    assert all(parameter.grad is None for parameter in explainer.model.parameters())
    assert not any(parameter.requires_grad for parameter in explainer.model.parameters())


def assert_all_words_at_once_equal_each_alone(explainer, caption, image, method, patches: int) -> None:
    """All of a caption's words explained in one call give each word's maps and score alone,
    one finite, non-negative map per map name over ``patches`` patches."""
    together = explainer.explain(image, caption, method=method)
    assert [maps.word for maps in together] == [word.text for word in caption.words]
    for index, maps in enumerate(together):
        (alone,) = explainer.explain(image, caption, word_indices=[index], method=method)
        assert maps.score == pytest.approx(alone.score, abs=1e-5)
        np.testing.assert_allclose(maps.cam_patches, alone.cam_patches, rtol=1e-4, atol=1e-10)
        assert maps.cam_patches.shape == (len(explainer.layer_names(method)), patches)
        assert np.isfinite(maps.cam_patches).all() and (maps.cam_patches >= 0).all()
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
