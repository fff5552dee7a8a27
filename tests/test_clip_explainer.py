"""CLIP explainer on a tiny random CLIP: similarity maths, layer choice, crop geometry, hooks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from models.clip_explainer import ClipExplainer
from tests.conftest import random_image


def test_similarity_is_cosine_x100_and_softmax_over_texts(tiny_clip):
    image = random_image(0)
    texts = ["a red dog", "a blue cat", "a square"]
    similarity = tiny_clip.similarity(image, texts)
    with torch.no_grad():
        inputs = tiny_clip.processor(images=image, text=texts, padding=True, return_tensors="pt")
        output = tiny_clip.model(**inputs)
    image_embedding = output.image_embeds[0].numpy()
    text_embeddings = output.text_embeds.numpy()
    cosine = text_embeddings @ image_embedding / (
        np.linalg.norm(text_embeddings, axis=1) * np.linalg.norm(image_embedding)
    )
    np.testing.assert_allclose(similarity.cosine_x100, 100 * cosine, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(similarity.probabilities, output.logits_per_image[0].softmax(-1).numpy(), atol=1e-5)
    assert similarity.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_default_layer_gives_a_real_map(tiny_clip):
    clip_map = tiny_clip.explain(random_image(1), "a red dog")
    assert clip_map.layer == len(tiny_clip.vision_layers) - 2
    assert clip_map.cam_patches.shape == (tiny_clip.image_geometry((48, 40)).patch_count,)
    assert np.isfinite(clip_map.cam_patches).all()
    assert clip_map.cam_patches.max() > 0


def test_last_layer_is_refused_not_blank(tiny_clip):
    last = len(tiny_clip.vision_layers) - 1
    assert last not in tiny_clip.cam_layers
    with pytest.raises(ValueError, match="zero gradient"):
        tiny_clip.explain(random_image(2), "a cat", layer=last)


def test_map_score_matches_similarity(tiny_clip):
    image = random_image(3)
    clip_map = tiny_clip.explain(image, "a blue square", layer=0, method="hirescam")
    expected = tiny_clip.similarity(image, ["a blue square"]).cosine_x100[0]
    assert clip_map.cosine_x100 == pytest.approx(expected, abs=1e-3)


def test_geometry_is_the_centre_crop(tiny_clip):
    (view,) = tiny_clip.image_geometry((96, 48)).views
    assert view.region_image == pytest.approx((24.0, 0.0, 72.0, 48.0))
    assert view.grid_shape == (4, 4)


def test_no_hook_is_left_and_no_gradient_stored(tiny_clip):
    tiny_clip.explain(random_image(4), "a dog")
    hooks_before = sum(len(module._forward_hooks) for module in tiny_clip.model.modules())
    with pytest.raises(ValueError):
        tiny_clip.explain(random_image(4), "a dog", method="magic")
    tiny_clip.explain(random_image(5), "a cat")
    assert sum(len(module._forward_hooks) for module in tiny_clip.model.modules()) == hooks_before
    assert all(parameter.grad is None for parameter in tiny_clip.model.parameters())


def test_default_layer_map_is_not_rounding_noise(tiny_clip):
    """HiResCAM at the default layer computed in float32 matches float64: a map read before the
    last layer's LayerNorm would be rounding noise (gradient orthogonal to the activation).

    A real CLIP's activations dwarf LayerNorm's eps; a tiny random one's do not, and eps alone
    then leaves a small exact residue. Shrinking eps puts the tiny model in the real regime.
    """
    model = copy.deepcopy(tiny_clip.model)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-12
    single_clip = ClipExplainer(model, tiny_clip.processor, tiny_clip.device)
    double_clip = ClipExplainer(copy.deepcopy(model).double(), tiny_clip.processor, tiny_clip.device)
    for seed in (6, 7, 8):
        image = random_image(seed)
        single = single_clip.explain(image, "a red dog", method="hirescam").cam_patches.ravel()
        double = double_clip.explain(image, "a red dog", method="hirescam").cam_patches.ravel()
        assert double.max() > 1e-4
        assert np.corrcoef(single, double)[0, 1] >= 0.999
