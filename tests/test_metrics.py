"""Faithfulness metrics on synthetic score functions and captioners whose right answers are known."""

import math

import numpy as np
import pytest
from PIL import Image

from utils.metrics import (
    Curve,
    box_first_order,
    box_mass,
    compare_maps,
    curves_by_order,
    find_removal_region,
    measure_curves,
    patch_order,
    pointing_game,
    rank_layers,
    rank_values,
    ratio_interval,
    region_schedule,
    spearman,
    step_counts,
)
from utils.patch_utils import Box, squash_geometry

# A 32 px image seen as a 4 x 4 grid of 8 px patches; patch id = row * 4 + column.
GEOMETRY = squash_geometry((32, 32), (4, 4))
# The synthetic "object": patches 5 and 6, i.e. row 1, columns 1 and 2 (x 8..24, y 8..16).
OBJECT_PATCHES = (5, 6)
FLOOR = 0.01


def white_image(size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), (255, 255, 255))


def object_brightness_log(images: list[Image.Image]) -> np.ndarray:
    """Log of (mean brightness of the object's pixels + FLOOR): falls as the object is masked."""
    brightness = [np.asarray(image, dtype=np.float64)[8:16, 8:24].mean() / 255 for image in images]
    return np.log(np.array(brightness) + FLOOR)


def true_map() -> np.ndarray:
    cam_grid = np.zeros((4, 4))
    cam_grid[1, 1], cam_grid[1, 2] = 2.0, 1.0
    return cam_grid


class CountingScorer:
    """Wraps a score function and records the batch size of every call."""

    def __init__(self, score_images):
        self.score_images = score_images
        self.batch_sizes: list[int] = []

    def __call__(self, images):
        self.batch_sizes.append(len(images))
        return self.score_images(images)


def test_step_counts_cover_zero_to_all_patches():
    assert step_counts(64).tolist() == list(range(0, 65, 2))
    assert step_counts(5).tolist() == [0, 1, 2, 3, 4, 5]
    assert step_counts(16, steps=4).tolist() == [0, 4, 8, 12, 16]
    with pytest.raises(ValueError):
        step_counts(16, steps=0)


def test_curve_auc_matches_hand_computation():
    curve = Curve("deletion", np.array([0.0, 0.5, 1.0]), np.log([0.8, 0.4, 0.2]), np.log(0.8))
    np.testing.assert_allclose(curve.relative_scores, [1.0, 0.5, 0.25])
    # Trapezoids of width 0.5: (1 + 0.5) / 2 * 0.5 + (0.5 + 0.25) / 2 * 0.5.
    assert curve.auc == pytest.approx(0.5625)
    assert curve.log_p_auc == pytest.approx(0.25 * (math.log(0.8) + 2 * math.log(0.4) + math.log(0.2)))


def test_patch_order_puts_highest_first_and_nan_last():
    cam_grid = np.array([[0.0, 3.0], [np.nan, 3.0]])
    assert patch_order(cam_grid).tolist() == [1, 3, 0, 2]


def test_deletion_by_true_map_has_hand_computed_auc_and_beats_random():
    curves = measure_curves(white_image(), GEOMETRY, true_map(), object_brightness_log, steps=16, random_orders=3)
    # One patch per step: half the object goes at step 1, all of it at step 2.
    half, gone = (0.5 + FLOOR) / (1 + FLOOR), FLOOR / (1 + FLOOR)
    expected_deletion = ((1 + half) / 2 + (half + gone) / 2 + 14 * gone) / 16
    assert curves.deletion.auc == pytest.approx(expected_deletion)
    assert curves.deletion.auc < curves.random_deletion.auc - 0.2
    assert curves.insertion.auc > curves.random_insertion.auc + 0.2
    np.testing.assert_allclose(curves.deletion.relative_scores[0], 1.0)
    np.testing.assert_allclose(curves.insertion.relative_scores[-1], 1.0)


def test_scoring_is_batched_into_chunks():
    scorer = CountingScorer(object_brightness_log)
    measure_curves(white_image(), GEOMETRY, true_map(), scorer, steps=16, chunk=5, random_orders=1)
    # Per direction: the heatmap's 17 images (16 steps + the unmasked end), then the random order's 17.
    assert len(scorer.batch_sizes) == 2 * 2 * math.ceil(17 / 5)
    assert max(scorer.batch_sizes) == 5
    assert sum(scorer.batch_sizes) == 2 * 2 * 17


def test_equal_masks_are_scored_once():
    scorer = CountingScorer(object_brightness_log)
    order = patch_order(true_map())
    first, second = curves_by_order(white_image(), GEOMETRY, [order, order.copy()], scorer, steps=16, chunk=64)
    assert scorer.batch_sizes == [17]
    np.testing.assert_array_equal(first.scores, second.scores)


def test_several_targets_share_one_set_of_images():
    def two_targets(images):
        return np.stack([object_brightness_log(images), np.zeros(len(images))], axis=1)

    scorer = CountingScorer(two_targets)
    (curve,) = curves_by_order(white_image(), GEOMETRY, [patch_order(true_map())], scorer, steps=4)
    assert curve.scores.shape == (5, 2)
    assert curve.auc.shape == (2,)
    assert curve.auc[1] == pytest.approx(1.0)  # a constant score never drops
    assert sum(scorer.batch_sizes) == 5


def test_curves_leave_inputs_unchanged():
    image, cam_grid = white_image(), true_map()
    pixels, cam_copy = np.asarray(image).copy(), cam_grid.copy()
    measure_curves(image, GEOMETRY, cam_grid, object_brightness_log, steps=4, fill="noise")
    np.testing.assert_array_equal(np.asarray(image), pixels)
    np.testing.assert_array_equal(cam_grid, cam_copy)


def test_rank_layers_names_the_layer_with_the_true_map():
    wrong = np.zeros((4, 4))
    wrong[3, 3] = 1.0
    ranking = rank_layers(
        white_image(), GEOMETRY, np.stack([wrong, true_map(), -true_map()]), object_brightness_log,
        ["layer 1", "layer 2", "layer 3"], steps=16,
    )
    assert ranking.best_layer == 1
    assert ranking.best_layer_name == "layer 2"
    assert ranking.deletion_auc.shape == (3,)


# Image of 64 x 64 on the 32 px model: one patch is 16 x 16 image pixels.
LARGE_GEOMETRY = squash_geometry((64, 64), (4, 4))  # the same grid on a 64 px image: 16 px patches


def peak_map(row: int, column: int) -> np.ndarray:
    cam_grid = np.zeros((4, 4))
    cam_grid[row, column] = 1.0
    return cam_grid


def test_pointing_game_hits_misses_and_tolerates_one_patch():
    cam_grid = peak_map(1, 2)  # image pixels x 32..48, y 16..32
    assert pointing_game(cam_grid, LARGE_GEOMETRY, [Box(32, 16, 48, 32)]) == 1.0
    neighbour = Box(48, 16, 64, 32)
    assert pointing_game(cam_grid, LARGE_GEOMETRY, [neighbour]) == 1.0
    assert pointing_game(cam_grid, LARGE_GEOMETRY, [neighbour], tolerance_patches=0) == 0.0
    assert pointing_game(cam_grid, LARGE_GEOMETRY, [Box(0, 48, 16, 64)]) == 0.0
    # Several boxes of one category: a hit on any of them counts.
    assert pointing_game(cam_grid, LARGE_GEOMETRY, [Box(0, 48, 16, 64), Box(32, 16, 48, 32)]) == 1.0


def test_pointing_game_of_constant_and_empty_maps():
    assert pointing_game(np.ones((4, 4)), LARGE_GEOMETRY, [Box(0, 0, 64, 64)]) == 0.0
    assert math.isnan(pointing_game(np.full((4, 4), np.nan), LARGE_GEOMETRY, [Box(0, 0, 8, 8)]))


def test_box_mass_is_the_share_of_positive_mass_inside():
    # A constant map puts mass in proportion to area: 16 x 32 of 64 x 64 pixels.
    assert box_mass(np.ones((4, 4)), LARGE_GEOMETRY, [Box(0, 0, 16, 32)]) == pytest.approx(0.125)
    assert box_mass(np.ones((4, 4)), LARGE_GEOMETRY, [Box(0, 0, 64, 64)]) == pytest.approx(1.0)
    assert math.isnan(box_mass(np.zeros((4, 4)), LARGE_GEOMETRY, [Box(0, 0, 16, 16)]))
    # Negative and NaN values carry no mass: only the left half (x < 32) counts.
    cam_grid = np.ones((4, 4))
    cam_grid[:, 2:] = -5.0
    cam_grid[0, 3] = np.nan
    assert box_mass(cam_grid, LARGE_GEOMETRY, [Box(0, 0, 32, 64)]) == pytest.approx(1.0)
    assert box_mass(cam_grid, LARGE_GEOMETRY, [Box(0, 0, 16, 64)]) < 0.8
    assert box_mass(peak_map(1, 2), LARGE_GEOMETRY, [Box(32, 16, 48, 32)]) > 0.5


class FakeCaptioner:
    """Says "red" until every patch of ``needed`` is masked black; counts its calls."""

    def __init__(self, needed, words=("a", "red", "circle")):
        self.needed, self.words, self.calls = needed, list(words), 0

    def __call__(self, image):
        self.calls += 1
        pixels = np.asarray(image)
        masked = [pixels[(patch // 4) * 8 + 4, (patch % 4) * 8 + 4].max() == 0 for patch in self.needed]
        if all(masked):
            return [word for index, word in enumerate(self.words) if word != "red" or index > 1]
        return list(self.words)


def test_region_schedule_grows_to_half_the_grid():
    assert region_schedule(16) == [1, 2, 3, 4, 6, 8]
    assert region_schedule(64)[-1] == 32


def test_minimal_region_finds_the_smallest_k_by_binary_search():
    captioner = FakeCaptioner(needed=(5, 6, 9))
    cam_grid = np.zeros(16)
    cam_grid[[5, 0, 6, 1, 9]] = [5, 4, 3, 2, 1]  # the needed patches are among the top 5
    region = find_removal_region(white_image(), GEOMETRY, cam_grid.reshape(4, 4), "red", captioner)
    assert region.removed
    assert region.patch_count == 5
    assert set(region.patch_ids) == {5, 0, 6, 1, 9}
    assert region.image_share == pytest.approx(5 / 16)
    assert "red" not in region.caption_words
    # Unmasked + schedule 1, 2, 3, 4, 6 + binary search at 5.
    assert region.caption_calls == captioner.calls == 7


def test_minimal_region_counts_one_of_repeated_words_and_reports_failure():
    words = ("a", "red", "circle", "and", "a", "red", "square")
    region = find_removal_region(white_image(), GEOMETRY, true_map(), "red", FakeCaptioner((5,), words))
    assert region.removed and region.patch_count == 1
    assert region.caption_words.count("red") == 1
    never = find_removal_region(white_image(), GEOMETRY, true_map(), "red", FakeCaptioner((15,)))
    assert not never.removed
    assert never.patch_count == 8  # the largest tried: half the grid
    with pytest.raises(ValueError, match="does not contain"):
        find_removal_region(white_image(), GEOMETRY, true_map(), "dog", FakeCaptioner((5,)))


def test_rank_values_averages_ties():
    np.testing.assert_array_equal(rank_values(np.array([3, 1, 3, 2])), [3.5, 1, 3.5, 2])
    np.testing.assert_array_equal(rank_values(np.array([7, 7, 7])), [2, 2, 2])


def test_spearman_matches_hand_values():
    # Ranks of b are 1, 2, 3.5, 5, 3.5: rho = 8 / sqrt(10 * 9.5).
    assert spearman(np.array([1, 2, 3, 4, 5]), np.array([5, 6, 7, 8, 7])) == pytest.approx(8 / math.sqrt(95))
    assert spearman(np.arange(6), -np.arange(6) ** 3) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.ones(4), np.arange(4)))
    # NaN positions are left out of both maps.
    assert spearman(np.array([1, 2, np.nan, 3]), np.array([1, 2, 0, 3])) == pytest.approx(1.0)


def test_compare_maps_flags_maps_that_survive_randomisation():
    before = np.arange(16, dtype=float).reshape(4, 4)
    assert compare_maps(before, before * 2 + 1).barely_depends
    shuffled = np.random.default_rng(0).permutation(16).reshape(4, 4)
    check = compare_maps(before, shuffled)
    assert check.correlation == pytest.approx(spearman(before, shuffled))
    assert not check.barely_depends


def test_box_first_order_takes_every_box_patch_before_any_other():
    rng = np.random.default_rng(0)
    orders = [box_first_order([6, 5, 6], GEOMETRY.patch_count, rng) for _ in range(20)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(GEOMETRY.patch_count))
        assert set(order[:2].tolist()) == set(OBJECT_PATCHES)
    # Each part is shuffled, not left in id order.
    assert len({tuple(order[:2]) for order in orders}) == 2
    assert len({tuple(order[2:]) for order in orders}) > 1


def test_box_first_deletion_falls_as_fast_as_the_true_map():
    order = box_first_order(OBJECT_PATCHES, GEOMETRY.patch_count, np.random.default_rng(0))
    (box_first,) = curves_by_order(white_image(), GEOMETRY, [order], object_brightness_log, steps=16)
    (by_map,) = curves_by_order(white_image(), GEOMETRY, [patch_order(true_map())], object_brightness_log, steps=16)
    assert box_first.auc == pytest.approx(by_map.auc)
    assert box_first.auc < 0.1


def test_ratio_interval_brackets_the_ratio_and_narrows_with_more_scenes():
    rng = np.random.default_rng(1)
    random_auc = rng.uniform(0.5, 0.8, size=400)
    map_auc = random_auc * rng.uniform(0.3, 0.7, size=400)  # ratio about 0.5
    ratio = map_auc.sum() / random_auc.sum()
    low, high = ratio_interval(map_auc, random_auc)
    assert low < ratio < high
    few_low, few_high = ratio_interval(map_auc[:25], random_auc[:25])
    assert few_high - few_low > 2 * (high - low)
    assert ratio_interval(map_auc, random_auc) == (low, high)  # seeded: reproducible


def test_ratio_interval_of_identical_scenes_has_no_width_and_empty_input_is_refused():
    assert ratio_interval([1.0] * 5, [4.0] * 5) == pytest.approx((0.25, 0.25))
    with pytest.raises(ValueError, match="non-empty"):
        ratio_interval([], [])
