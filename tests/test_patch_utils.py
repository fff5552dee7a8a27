"""Geometry round trips, rectangles, patch sets and masking, all pure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from utils.patch_utils import (
    Box,
    ImageGeometry,
    aspect_resize_geometry,
    box_from_corners,
    centre_crop_geometry,
    click_to_image,
    mask_boxes,
    mask_patches,
    squash_geometry,
    tiled_geometry,
    top_patches,
)


def squash(image_size: tuple[int, int]) -> ImageGeometry:
    return squash_geometry(image_size, (24, 24))  # BLIP base: 384 px, 16 px patches


def crop(image_size: tuple[int, int]) -> ImageGeometry:
    return centre_crop_geometry(image_size, (224, 224), 32)  # CLIP B/32


def aspect_resize(image_size: tuple[int, int]) -> ImageGeometry:
    """Qwen2-VL style: resized to multiples of 28 with the aspect about kept."""
    width, height = image_size
    return aspect_resize_geometry(image_size, (round(height / 28) * 28, round(width / 28) * 28), 14)


def tiles(image_size: tuple[int, int]) -> ImageGeometry:
    """SmolVLM style: 2 x 3 tiles of 4 x 4 patches, then a 4 x 4 global view."""
    return tiled_geometry(image_size, (2, 3), (4, 4), (4, 4))


GEOMETRIES = [squash, crop, aspect_resize, tiles]


def test_grid_comes_from_the_model_sizes():
    assert squash((640, 480)).views[0].grid_shape == (24, 24) and squash((640, 480)).patch_count == 576
    assert crop((640, 480)).views[0].grid_shape == (7, 7)
    assert aspect_resize((640, 480)).views[0].grid_shape == (34, 46)
    assert tiles((640, 480)).patch_count == 6 * 16 + 16


@pytest.mark.parametrize("build", GEOMETRIES)
@pytest.mark.parametrize("image_size", [(640, 480), (300, 900)])
def test_a_one_hot_patch_lands_inside_its_own_patch(build, image_size):
    geometry = build(image_size)
    for patch_id in sorted({0, geometry.patch_count // 3, geometry.patch_count - 1}):
        one_hot = np.zeros(geometry.patch_count, dtype=np.float32)
        one_hot[patch_id] = 1.0
        cam_image = geometry.cam_to_image(one_hot)
        assert cam_image.shape == (image_size[1], image_size[0])
        peak_y, peak_x = np.unravel_index(np.nanargmax(cam_image), cam_image.shape)
        box = geometry.patch_box_image(patch_id)
        assert box.contains(peak_x, peak_y), (patch_id, box, (peak_x, peak_y))


@pytest.mark.parametrize("build", GEOMETRIES)
@pytest.mark.parametrize("image_size", [(640, 480), (300, 900)])
def test_patch_box_round_trip(build, image_size):
    """A patch's box, shrunk to its centre pixel, selects that patch, and only patches whose
    boxes hold that pixel (where a global view overlaps the tiles, their patches too)."""
    geometry = build(image_size)
    for patch_id in range(0, geometry.patch_count, max(1, geometry.patch_count // 17)):
        box = geometry.patch_box_image(patch_id)
        x, y = (box.x0 + box.x1) // 2, (box.y0 + box.y1) // 2
        selected = geometry.patches_in_box(Box(x, y, x + 1, y + 1))
        assert patch_id in selected
        assert all(geometry.patch_box_image(other).contains(x, y) for other in selected)
        if len(geometry.views) == 1:
            assert selected == [patch_id]


def test_squash_patch_of_a_wide_image_is_wide():
    geometry = squash((768, 192))  # squashed: a patch is 32 x 8 image pixels
    for patch_id in [0, 25, 575]:
        box = geometry.patch_box_image(patch_id)
        assert (box.width, box.height) == (32, 8)
        assert geometry.patches_in_box(box) == [patch_id]


def test_crop_cuts_the_long_side_margins():
    # 448 x 224: scaled by 1, the central 224 x 224 is kept; 112 px margins each side.
    (view,) = crop((448, 224)).views
    assert view.region_image == pytest.approx((112, 0, 336, 224))
    assert crop((448, 224)).patch_box_image(0) == Box(112, 0, 144, 32)


def test_tiles_and_global_view_are_numbered_view_after_view():
    geometry = tiles((600, 400))  # tiles of 200 x 200, patches of 50 x 50; global patches 150 x 100
    assert geometry.patch_box_image(0) == Box(0, 0, 50, 50)
    assert geometry.patch_box_image(16) == Box(200, 0, 250, 50)  # first patch of the second tile
    assert geometry.patch_box_image(96) == Box(0, 0, 150, 100)  # first patch of the global view
    assert geometry.finest_patch_image == (50.0, 50.0)
    xs, ys = geometry.patch_lines_image()
    assert xs == [50.0 * index for index in range(13)] and ys == [50.0 * index for index in range(9)]


def test_box_from_corners_in_any_order_is_clamped():
    image_size = (100, 50)
    assert box_from_corners((10, 40), (30, 5), image_size) == Box(10, 5, 31, 41)
    assert box_from_corners((30, 5), (10, 40), image_size) == Box(10, 5, 31, 41)
    assert box_from_corners((-20, -3), (500, 70), image_size) == Box(0, 0, 100, 50)


def test_patches_in_box_touching_a_patch_selects_it():
    geometry = squash((384, 384))
    assert geometry.patches_in_box(Box(0, 0, 16, 16)) == [0]
    assert geometry.patches_in_box(Box(15, 15, 17, 17)) == [0, 1, 24, 25]
    assert geometry.patches_in_box(Box(5, 5, 5, 9)) == []
    assert len(geometry.patches_in_box(Box(0, 0, 384, 384))) == 576


def test_top_patches_takes_the_highest():
    cam_grid = np.array([[0.1, 0.9], [0.5, 0.2]])
    assert top_patches(cam_grid, 0.5) == [1, 2]
    assert top_patches(cam_grid, 0.01) == [1]
    with pytest.raises(ValueError):
        top_patches(cam_grid, 0)


def test_maps_leave_crop_margins_nan_and_overlapping_views_averaged():
    cam_image = crop((448, 224)).cam_to_image(np.ones(49, dtype=np.float32))
    assert cam_image.shape == (224, 448)
    assert np.isnan(cam_image[:, :112]).all() and np.isnan(cam_image[:, 336:]).all()
    assert np.allclose(cam_image[:, 112:336], 1.0)
    squashed = squash((500, 120)).cam_to_image(np.ones(576))
    assert squashed.shape == (120, 500) and not np.isnan(squashed).any()
    tiled = tiles((600, 400))
    tile_ones_global_zeros = np.concatenate([np.ones(96), np.zeros(16)])
    assert np.allclose(tiled.cam_to_image(tile_ones_global_zeros), 0.5)
    with pytest.raises(ValueError):
        squash((10, 10)).cam_to_image(np.ones(9))


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
    geometry = squash_geometry(image.size, (2, 2))  # 2 x 2 patches, each 32 x 16 image pixels
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
