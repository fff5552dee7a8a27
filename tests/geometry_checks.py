"""A family's geometry checked against its real image processor (shared by the families' tests)."""

from __future__ import annotations

import numpy as np
from PIL import Image

MIN_WHITENESS = 0.8


def patch_brightness(explainer, image: Image.Image, grid_shape: tuple[int, int]) -> np.ndarray:
    """(patches,) mean of each patch of the model's input for ``image``, row-major."""
    (pixel_values,) = explainer.processor.image_processor(images=[image], return_tensors="np")["pixel_values"]
    rows, columns = grid_shape
    brightness = pixel_values.mean(axis=0)  # (H, W) in model pixels, normalised
    height, width = brightness.shape
    return brightness.reshape(rows, height // rows, columns, width // columns).mean(axis=(1, 3)).ravel()


def assert_patch_boxes_reach_their_own_patches(explainer, image_size: tuple[int, int]) -> None:
    """Each patch's box on the original image, painted white on black and sent through the
    explainer's real image processor, is brightest at that very patch of the model's input.

    Args:
        explainer: has ``image_geometry`` (one view) and ``processor.image_processor``.
        image_size: (width, height) of the original image; make it non-square.
    """
    geometry = explainer.image_geometry(image_size)
    (view,) = geometry.views
    black = np.zeros((image_size[1], image_size[0], 3), dtype=np.uint8)
    darkest = patch_brightness(explainer, Image.fromarray(black), view.grid_shape)
    brightest = patch_brightness(explainer, Image.fromarray(black + 255), view.grid_shape)
    for patch_id in range(geometry.patch_count):
        box = geometry.patch_box_image(patch_id)
        pixels = black.copy()
        pixels[box.y0 : box.y1, box.x0 : box.x1] = 255
        # 0 where a model patch stayed black, 1 where it is all white.
        whiteness = (patch_brightness(explainer, Image.fromarray(pixels), view.grid_shape) - darkest) / (
            brightest - darkest
        )
        found = int(whiteness.argmax())
        assert found == patch_id, f"patch {patch_id} (box {box} of {image_size}) lands on model patch {found}"
        # Resampling blurs the box's edges a little; a box on the wrong place leaves most of it dark.
        assert whiteness[patch_id] >= MIN_WHITENESS, (patch_id, box, whiteness[patch_id])
