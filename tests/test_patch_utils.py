"""Geometry round trips, rectangles, patch sets and masking, all pure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from utils.patch_utils import (
    Box,
    PatchGeometry,
    box_from_corners,
    cam_grid_to_image,
    click_to_image,
    mask_boxes,
    mask_patches,
    patches_in_box,
    top_patches,
)

SQUASH = PatchGeometry(model_size=(384, 384), patch_size=16, resize_mode="squash")
CROP = PatchGeometry(model_size=(224, 224), patch_size=32, resize_mode="shortest_edge_crop")


def test_grid_comes_from_the_geometry():
    assert SQUASH.grid_shape == (24, 24) and SQUASH.patch_count == 576
    assert CROP.grid_shape == (7, 7)
    assert PatchGeometry((128, 96), 16, "squash").grid_shape == (8, 6)


@pytest.mark.parametrize("geometry", [SQUASH, CROP])
@pytest.mark.parametrize("image_size", [(640, 480), (300, 900), (224, 224)])
def test_image_model_round_trip(geometry, image_size):
    x0, y0, x1, y1 = geometry.visible_box(image_size)
    for point in [(x0, y0), ((x0 + x1) / 2, (y0 + y1) / 3), (x1 - 1, y1 - 1)]:
        model_point = geometry.image_to_model_point(image_size, point)
        assert geometry.model_to_image_point(image_size, model_point) == pytest.approx(point)


def test_squash_maps_corners_to_corners():
    assert SQUASH.image_to_model_point((800, 200), (800, 200)) == pytest.approx((384, 384))
    assert SQUASH.patch_at_model_point((383.9, 0)) == 23
    assert SQUASH.patch_at_model_point((384, 0)) is None


def test_crop_cuts_the_long_side_margins():
    # 448 x 224: scaled by 1, the central 224 x 224 is kept; 112 px margins each side.
    assert CROP.visible_box((448, 224)) == pytest.approx((112, 0, 336, 224))
    assert CROP.image_to_model_point((448, 224), (112, 0)) == pytest.approx((0, 0))


def test_box_from_corners_in_any_order_is_clamped():
    image_size = (100, 50)
    assert box_from_corners((10, 40), (30, 5), image_size) == Box(10, 5, 31, 41)
    assert box_from_corners((30, 5), (10, 40), image_size) == Box(10, 5, 31, 41)
    assert box_from_corners((-20, -3), (500, 70), image_size) == Box(0, 0, 100, 50)


def test_patches_in_box_touching_a_patch_selects_it():
    image_size = (384, 384)
    assert patches_in_box(SQUASH, image_size, Box(0, 0, 16, 16)) == [0]
    assert patches_in_box(SQUASH, image_size, Box(15, 15, 17, 17)) == [0, 1, 24, 25]
    assert patches_in_box(SQUASH, image_size, Box(5, 5, 5, 9)) == []
    assert len(patches_in_box(SQUASH, image_size, Box(0, 0, 384, 384))) == 576


def test_patch_box_round_trip_on_a_non_square_image():
    image_size = (768, 192)  # squashed: a patch is 32 x 8 image pixels
    for patch_id in [0, 25, 575]:
        box = SQUASH.patch_box_image(image_size, patch_id)
        assert (box.width, box.height) == (32, 8)
        assert patches_in_box(SQUASH, image_size, box) == [patch_id]


def test_top_patches_takes_the_highest():
    cam_grid = np.array([[0.1, 0.9], [0.5, 0.2]])
    assert top_patches(cam_grid, 0.5) == [1, 2]
    assert top_patches(cam_grid, 0.01) == [1]
    with pytest.raises(ValueError):
        top_patches(cam_grid, 0)


def test_cam_grid_to_image_marks_crop_margins_as_nan():
    cam_grid = np.ones(CROP.grid_shape, dtype=np.float32)
    cam_image = cam_grid_to_image(cam_grid, CROP, (448, 224))
    assert cam_image.shape == (224, 448)
    assert np.isnan(cam_image[:, :112]).all() and np.isnan(cam_image[:, 336:]).all()
    assert np.allclose(cam_image[:, 112:336], 1.0)
    squashed = cam_grid_to_image(np.ones(SQUASH.grid_shape), SQUASH, (500, 120))
    assert squashed.shape == (120, 500) and not np.isnan(squashed).any()
    with pytest.raises(ValueError):
        cam_grid_to_image(np.ones((3, 3)), SQUASH, (10, 10))


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(42).integers(0, 256, (60, 80, 3), dtype=np.uint8))


@pytest.mark.parametrize("fill", ["black", "mean", "blur", "noise", (10, 200, 30)])
def test_masking_changes_only_the_box_and_never_the_input(fill):
    image = _image()
    before = np.asarray(image).copy()
    masked = np.asarray(mask_boxes(image, [Box(10, 20, 30, 40)], fill))
    np.testing.assert_array_equal(np.asarray(image), before)
    outside = np.ones(before.shape[:2], dtype=bool)
    outside[20:40, 10:30] = False
    np.testing.assert_array_equal(masked[outside], before[outside])
    assert not np.array_equal(masked[20:40, 10:30], before[20:40, 10:30])
    if isinstance(fill, tuple):
        assert (masked[20:40, 10:30] == fill).all()


def test_mask_fill_modes_are_reproducible_and_validated():
    image = _image()
    first = mask_boxes(image, [Box(0, 0, 10, 10)], "noise", seed=3)
    assert np.array_equal(np.asarray(first), np.asarray(mask_boxes(image, [Box(0, 0, 10, 10)], "noise", seed=3)))
    with pytest.raises(ValueError):
        mask_boxes(image, [Box(0, 0, 10, 10)], "sparkles")
    with pytest.raises(ValueError):
        mask_boxes(image, [Box(0, 0, 10, 10)], (300, 0, 0))


def test_mask_patches_covers_exactly_those_patches():
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    geometry = PatchGeometry((32, 32), 16, "squash")  # 2 x 2 patches, each 32 x 16 image pixels
    masked = np.asarray(mask_patches(image, geometry, [1], "black"))
    assert (masked[:16, 32:] == 0).all()
    assert (masked[:16, :32] == 255).all() and (masked[16:] == 255).all()


def test_a_click_is_scaled_from_displayed_to_image_pixels():
    assert click_to_image({"x": 105, "y": 42, "width": 420, "height": 210, "unix_time": 1}, (840, 420)) == (210, 84)


@pytest.mark.parametrize(
    "value",
    [None, "x", [1, 2], {"x": 1, "y": 1, "width": 0, "height": 10}, {"x": 1e308, "y": 1, "width": 10, "height": 10},
     {"x": "1", "y": 1, "width": 10, "height": 10}, {"x": float("inf"), "y": 1, "width": 10, "height": 10},
     {"x": 1, "y": float("nan"), "width": 10, "height": 10}, {"x": -1, "y": 1, "width": 10, "height": 10},
     {"x": 1, "y": 1, "width": 10, "height": -10}, {"x": False, "y": 1, "width": 10, "height": 10},
     {"y": 1, "width": 10, "height": 10}],
)
def test_a_malformed_click_is_ignored(value):
    assert click_to_image(value, (100, 100)) is None
