"""The strict pointing game: a patch at the map's peak must overlap the object's box, no tolerance."""

import math

import numpy as np
import pytest

from models.evaluation import pointing_game_strict
from utils.metrics import pointing_game
from utils.patch_utils import Box, squash_geometry

# A 64 x 64 image seen as 4 x 4 patches of 16 px; patch id = row * 4 + column.
GEOMETRY = squash_geometry((64, 64), (4, 4))
BOX = Box(20, 20, 30, 30)  # inside patch 5 (row 1, column 1) only


def peak_at(*patch_ids: int) -> np.ndarray:
    cam_patches = np.zeros(16, dtype=np.float32)
    cam_patches[list(patch_ids)] = 1.0
    return cam_patches


def test_the_peak_patch_on_the_box_hits():
    assert pointing_game_strict(peak_at(5), GEOMETRY, [BOX]) == 1.0


def test_a_neighbouring_patch_misses_where_the_tolerant_game_forgives_it():
    neighbour = peak_at(6)
    assert pointing_game_strict(neighbour, GEOMETRY, [BOX]) == 0.0
    assert pointing_game(neighbour, GEOMETRY, [BOX]) == 1.0


def test_a_box_ending_on_a_patch_edge_does_not_overlap_the_next_patch():
    edge_box = Box(0, 0, 16, 16)  # x1, y1 exclusive: patch 0 only
    assert pointing_game_strict(peak_at(0), GEOMETRY, [edge_box]) == 1.0
    assert pointing_game_strict(peak_at(1), GEOMETRY, [edge_box]) == 0.0
    assert pointing_game_strict(peak_at(4), GEOMETRY, [edge_box]) == 0.0


def test_a_peak_shared_by_a_merged_block_hits_when_any_of_its_patches_overlaps():
    """Qwen2-VL's attention gives a 2x2 block one value: the block is the peak."""
    block = peak_at(10, 11, 14, 15)  # rows 2-3, columns 2-3: pixels 32-64
    assert pointing_game_strict(block, GEOMETRY, [Box(40, 50, 48, 60)]) == 1.0
    assert pointing_game_strict(block, GEOMETRY, [BOX]) == 0.0


def test_any_of_several_boxes_counts():
    assert pointing_game_strict(peak_at(6), GEOMETRY, [BOX, Box(36, 20, 40, 24)]) == 1.0


def test_a_constant_map_points_nowhere_and_an_empty_one_is_undefined():
    assert pointing_game_strict(np.ones(16, dtype=np.float32), GEOMETRY, [BOX]) == 0.0
    assert math.isnan(pointing_game_strict(np.full(16, np.nan, dtype=np.float32), GEOMETRY, [BOX]))


@pytest.mark.parametrize("nan_patch", [0, 6])
def test_nan_patches_are_ignored(nan_patch):
    cam_patches = peak_at(5)
    cam_patches[nan_patch] = np.nan
    assert pointing_game_strict(cam_patches, GEOMETRY, [BOX]) == 1.0
