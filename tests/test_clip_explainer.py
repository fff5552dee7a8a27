"""CLIP explainer on a tiny random CLIP: similarity maths, maps against a hand-run vision tower,
layer choice, crop geometry against the real processor, hooks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional

from models.clip_explainer import CLIP_METHODS, ClipExplainer
from tests.conftest import random_image
from tests.geometry_checks import assert_patch_boxes_reach_their_own_patches


def hand_run_map(clip: ClipExplainer, image, text: str, layer: int, method: str, read_raw: bool = False) -> np.ndarray:
    """A map recomputed without the explainer, its hooks or its CAM functions: the vision tower
    run block by block, the chosen activation made a leaf, the CAM formula written out.

    The deepest map reads the last block's first LayerNorm output (``read_raw`` reads the block
    before it instead, which is what a wrong implementation would do).
    """
    model, vision = clip.model, clip.model.vision_model
    inputs = clip.processor(images=image, text=[text], padding=True, return_tensors="pt")
    with torch.no_grad():
        text_features = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    text_embedding = functional.normalize(text_features.pooler_output, dim=-1)  # (1, D)
    blocks = vision.encoder.layers
    reads_layer_norm = layer == len(blocks) - 2 and not read_raw
    with torch.enable_grad():
        hidden = vision.pre_layrnorm(vision.embeddings(inputs.pixel_values))  # (1, T, D)
        for index, block in enumerate(blocks):
            if reads_layer_norm and index == len(blocks) - 1:
                activation = block.layer_norm1(hidden).detach().requires_grad_(True)
                hidden = hidden + block.self_attn(hidden_states=activation, attention_mask=None)[0]
                hidden = hidden + block.mlp(block.layer_norm2(hidden))
                continue
            hidden = block(hidden, None)
            if index == layer and not reads_layer_norm:
                activation = hidden = hidden.detach().requires_grad_(True)
        image_embedding = functional.normalize(model.visual_projection(vision.post_layernorm(hidden[:, 0])), dim=-1)
        (gradient,) = torch.autograd.grad((image_embedding * text_embedding).sum(), activation)
    tokens, gradients = activation[0, 1:].detach(), gradient[0, 1:]  # patch tokens, CLS dropped
    if method == "gradcam":
        return torch.relu((gradients.mean(dim=0) * tokens).sum(dim=-1)).numpy()
    return torch.relu((gradients * tokens).sum(dim=-1)).numpy()


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


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_every_map_equals_the_hand_run_vision_tower(tiny_clip, method):
    image = random_image(12, (56, 40))
    for layer in tiny_clip.cam_layers:
        clip_map = tiny_clip.explain(image, "a red dog", layer=layer, method=method)
        expected = hand_run_map(tiny_clip, image, "a red dog", layer, method)
        assert expected.max() > 0 and np.count_nonzero(expected) >= 2, "a blank map would prove nothing"
        np.testing.assert_allclose(clip_map.cam_patches, expected, rtol=1e-4, atol=1e-8)
    other_layer = hand_run_map(tiny_clip, image, "a red dog", 0, method)
    assert not np.allclose(other_layer, clip_map.cam_patches, rtol=1e-2), "the test must tell the layers apart"


def test_deepest_map_is_read_after_the_last_layer_norm_not_before(tiny_clip):
    image = random_image(13)
    deepest = tiny_clip.default_layer
    clip_map = tiny_clip.explain(image, "a blue square", method="hirescam")
    raw = hand_run_map(tiny_clip, image, "a blue square", deepest, "hirescam", read_raw=True)
    assert not np.allclose(clip_map.cam_patches, raw, rtol=1e-2, atol=1e-6)
    assert "normalised" in clip_map.layer_name


def test_crop_margins_change_neither_the_map_nor_the_score(tiny_clip):
    """A 96 x 48 image is seen as its central 48 x 48 (x from 24 to 72): whatever the margins
    hold, CLIP sees the same pixels, while a change inside the crop changes the map."""
    pixels = np.asarray(random_image(14, (96, 48))).copy()
    original = tiny_clip.explain(Image.fromarray(pixels), "a red dog", method="hirescam")
    margins = pixels.copy()
    margins[:, :18] = 255 - margins[:, :18]  # a few pixels short of the crop: resampling reads near it
    margins[:, 78:] = 0
    with_margins = tiny_clip.explain(Image.fromarray(margins), "a red dog", method="hirescam")
    np.testing.assert_array_equal(with_margins.cam_patches, original.cam_patches)
    assert with_margins.cosine_x100 == original.cosine_x100
    inside = pixels.copy()
    inside[:, 40:56] = 255 - inside[:, 40:56]
    changed = tiny_clip.explain(Image.fromarray(inside), "a red dog", method="hirescam")
    assert not np.allclose(changed.cam_patches, original.cam_patches)


@pytest.mark.parametrize("image_size", [(96, 48), (50, 90)])
def test_crop_geometry_matches_the_real_processor(tiny_clip, image_size):
    assert_patch_boxes_reach_their_own_patches(tiny_clip, image_size)


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


def test_a_text_longer_than_clip_reads_is_cut_and_the_page_can_say_which_part(tiny_clip):
    assert tiny_clip.max_text_tokens == 32
    short = "a red circle on grass"
    assert tiny_clip.text_seen(short) is None
    long = " ".join(["a red dog and a blue cat on grass"] * 5)  # 45 words: more than 30 fit
    seen = tiny_clip.text_seen(long)
    assert seen is not None and long.startswith(seen) and len(seen.split()) == 30  # 32 less [CLS], [SEP]
    image = random_image(3)
    cut, whole_part = tiny_clip.similarity(image, [long, seen]).cosine_x100
    assert cut == pytest.approx(whole_part, abs=1e-4), "CLIP scored exactly the part it read"
    assert tiny_clip.explain(image, long).cosine_x100 == pytest.approx(cut, abs=1e-4)
