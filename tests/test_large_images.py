"""A 49-megapixel upload: the page works on a small copy, and the model sees what it would see."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.analysis import caption_image, mask_and_recaption
from models.explainer import Decoding
from models.families import load_captioner
from utils.image_utils import WORKING_MAX_SIDE, load_working_image
from utils.patch_utils import Box
from utils.shapes_world import generate_scene

SIDE = 7000  # 49 megapixels, under the 50 MP cap
SCENE = generate_scene(99999)


@pytest.fixture(scope="module")
def large_upload() -> tuple[Image.Image, bytes]:
    original = SCENE.image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    original.save(buffer, "PNG")
    return original, buffer.getvalue()


@pytest.fixture(scope="module")
def demo():
    return load_captioner("shapes-demo", device="cpu")


def test_the_working_copy_is_small_and_remembers_the_original(large_upload):
    original, data = large_upload
    working = load_working_image(data)
    assert working.image.size == (WORKING_MAX_SIDE, WORKING_MAX_SIDE)
    assert working.original_size == (SIDE, SIDE)
    assert working.original_box((0, 1024, 2048, 2048)) == (0, 3500, 7000, 7000)


def test_caption_maps_and_causal_test_match_the_original(large_upload, demo):
    """The model's input from the copy differs from its input from the original by at most one
    grey level (its own resize rounds differently), and nothing the page shows changes."""
    original, data = large_upload
    working = load_working_image(data).image
    from_original = demo.model_inputs([original])["pixel_values"]
    from_copy = demo.model_inputs([working])["pixel_values"]
    one_grey_level = 1 / 255 / min(demo.processor.image_processor.image_std)
    assert (from_original - from_copy).abs().max().item() <= one_grey_level * 1.01

    caption = caption_image(demo, original, Decoding())
    assert caption_image(demo, working, Decoding()).token_ids == caption.token_ids
    for maps_original, maps_copy in zip(demo.explain(original, caption), demo.explain(working, caption), strict=True):
        for layer_original, layer_copy in zip(maps_original.cam_patches, maps_copy.cam_patches, strict=True):
            assert np.corrcoef(layer_original, layer_copy)[0, 1] >= 0.99

    x0, y0, x1, y1 = SCENE.objects[0].box
    scale = SIDE / SCENE.image.width
    box_original = Box(int(x0 * scale), int(y0 * scale), int((x1 + 1) * scale), int((y1 + 1) * scale))
    to_copy = WORKING_MAX_SIDE / SIDE
    box_copy = Box(*(round(value * to_copy) for value in vars(box_original).values()))
    masked_original = mask_and_recaption(demo, original, caption, [box_original], "mean", Decoding())
    masked_copy = mask_and_recaption(demo, working, caption, [box_copy], "mean", Decoding())
    assert masked_copy.caption.token_ids == masked_original.caption.token_ids
    assert masked_copy.removed == masked_original.removed
    np.testing.assert_allclose(masked_copy.log_prob_change, masked_original.log_prob_change, atol=0.1)
