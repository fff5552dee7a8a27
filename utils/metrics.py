"""Faithfulness metrics for heatmaps: deletion/insertion curves, pointing game, minimal regions.

Model-agnostic: the model comes in as plain callables, so the same code serves the app, the
shapes benchmark and ``evaluate.py``.

- ``ScoreImages``: a list of PIL images -> one score per image, shape (images,), or several
  targets per image, shape (images, targets) (e.g. the log p of every word of a caption, so
  one set of masked images serves all words). Scores are log-probabilities: the "relative"
  variants below are p / p(unmasked image) = exp(score - score of the unmasked image).
- ``CaptionWords``: an image -> the words of its regenerated caption.

Curves follow Petsiuk et al. (2018, RISE): deletion masks patches of the image, most relevant
first, and a faithful map makes the score fall fast (low AUC); insertion starts from the fully
masked image and restores patches (high AUC). A random patch order is the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from utils.patch_utils import Box, Colour, FillMode, ImageGeometry, mask_patches

ScoreImages = Callable[[list[Image.Image]], np.ndarray]
CaptionWords = Callable[[Image.Image], list[str]]
Direction = Literal["deletion", "insertion"]

MAX_STEPS = 32
SCORE_CHUNK = 16
RANDOM_ORDERS = 3
# Scene resamples of the bootstrap interval of a deletion ratio.
BOOTSTRAP_RESAMPLES = 2000
# Adebayo et al. (2018): a map that survives weight randomisation this well explains nothing.
HIGH_CORRELATION = 0.9
# Minimal region search: patch counts tried in order, as shares of the grid, up to this share.
REGION_MAX_SHARE = 0.5
REGION_SCHEDULE_GROWTH = 1.5


@dataclass(frozen=True)
class Curve:
    """Scores of progressively masked (deletion) or restored (insertion) images.

    Args:
        direction: "deletion" or "insertion".
        fractions: (steps,) share of patches masked (deletion) or restored (insertion), 0 to 1.
        scores: (steps,) or (steps, targets) raw scores (log p).
        reference: () or (targets,) score of the unmasked image.
    """

    direction: str
    fractions: np.ndarray
    scores: np.ndarray
    reference: np.ndarray

    @property
    def relative_scores(self) -> np.ndarray:
        """p / p(unmasked): 1 where masking changed nothing; same shape as ``scores``."""
        return np.exp(self.scores - self.reference)

    @property
    def auc(self) -> np.ndarray:
        """Area under ``relative_scores`` over fractions 0..1 (the headline number); () or (targets,)."""
        return np.trapezoid(self.relative_scores, self.fractions, axis=0)

    @property
    def log_p_auc(self) -> np.ndarray:
        """Area under the raw log p curve over fractions 0..1; () or (targets,)."""
        return np.trapezoid(self.scores, self.fractions, axis=0)


@dataclass(frozen=True)
class CurveSet:
    """Deletion and insertion by the heatmap, and both by random orders (mean over orders)."""

    deletion: Curve
    insertion: Curve
    random_deletion: Curve
    random_insertion: Curve


@dataclass(frozen=True)
class LayerRanking:
    """Deletion AUC of each layer's map; the best layer deletes fastest (lowest AUC).

    Args:
        layer_names: (layers,) labels.
        deletion_auc: (layers,) relative deletion AUC, or (layers, targets).
        best_layer: index of the lowest AUC (of the mean over targets).
    """

    layer_names: tuple[str, ...]
    deletion_auc: np.ndarray
    best_layer: int

    @property
    def best_layer_name(self) -> str:
        return self.layer_names[self.best_layer]


@dataclass(frozen=True)
class RemovalRegion:
    """The fewest top patches of a heatmap whose masking removes a word from the caption.

    Args:
        word: the word to remove.
        removed: whether any tried region removed it.
        patch_ids: the masked patches (the smallest removing set, else the largest tried).
        image_share: share of the image's pixels masked, 0 to 1.
        caption_words: the regenerated caption of the image with ``patch_ids`` masked.
        caption_calls: how many captions the search generated (the unmasked one included).
    """

    word: str
    removed: bool
    patch_ids: tuple[int, ...]
    image_share: float
    caption_words: tuple[str, ...]
    caption_calls: int

    @property
    def patch_count(self) -> int:
        return len(self.patch_ids)


@dataclass(frozen=True)
class SanityCheck:
    """Model-randomisation check (Adebayo et al., 2018) of one map.

    Args:
        correlation: Spearman rank correlation of the maps before and after randomising
            weights, -1 to 1 (NaN when either map is constant).
        barely_depends: True when the correlation exceeds the threshold: the explanation
            barely depends on the weights, so it cannot be explaining them.
    """

    correlation: float
    barely_depends: bool


def patch_order(cam_patches: np.ndarray) -> np.ndarray:
    """Patch ids, most relevant first; ties in row-major order, NaN last.

    Args:
        cam_patches: (patches,) heatmap (any shape with one value per patch).
    Returns:
        (patches,) int64.
    """
    flat = np.asarray(cam_patches, dtype=np.float64).ravel()
    return np.argsort(-np.nan_to_num(flat, nan=-np.inf), kind="stable")


def box_first_order(box_patches: Sequence[int], patch_count: int, rng: np.random.Generator) -> np.ndarray:
    """The reference order of ground truth: the object's box patches first, then the others,
    each part shuffled. Its deletion curve is what a map that knows where the object is, and
    nothing more, would score; a map can beat it only by ordering patches within the box (or
    outside it) better than chance.

    Args:
        box_patches: ids of the patches the object's box touches.
        patch_count: patches in the grid.
        rng: shuffles both parts.
    Returns:
        (patch_count,) int64, a permutation of the patch ids.
    """
    inside = np.unique(np.asarray(box_patches, dtype=np.int64))
    outside = np.setdiff1d(np.arange(patch_count), inside)
    return np.concatenate([rng.permutation(inside), rng.permutation(outside)])


def random_patch_orders(patch_count: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` random permutations of the patch ids, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(patch_count) for _ in range(count)]


def step_counts(patch_count: int, steps: int | None = None) -> np.ndarray:
    """Number of patches masked (or restored) at each step: 0 to ``patch_count`` evenly spaced.

    Args:
        patch_count: patches in the grid.
        steps: intervals between 0 and all patches; None for min(patch_count, MAX_STEPS).
    Returns:
        (steps + 1,) int64, increasing, first 0, last ``patch_count``.
    """
    steps = min(patch_count, MAX_STEPS) if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return np.unique(np.round(np.linspace(0, patch_count, steps + 1)).astype(np.int64))


def masked_patch_sets(order: np.ndarray, counts: np.ndarray, direction: Direction) -> list[np.ndarray]:
    """Patches to mask at each step: the first ``count`` of ``order`` (deletion), or all but them (insertion)."""
    if direction == "deletion":
        return [order[:count] for count in counts]
    if direction == "insertion":
        return [order[count:] for count in counts]
    raise ValueError(f"unknown direction {direction!r}")


def score_masked_images(
    image: Image.Image,
    geometry: ImageGeometry,
    patch_sets: Sequence[np.ndarray],
    score_images: ScoreImages,
    *,
    fill: FillMode | Colour = "black",
    chunk: int = SCORE_CHUNK,
    seed: int = 0,
) -> np.ndarray:
    """Score the image with each patch set masked, ``chunk`` images per call of ``score_images``.

    Equal sets (every order's unmasked and fully masked ends) are scored once. Images are
    built one chunk at a time, so a large photo is never held hundreds of times.

    Args:
        image: RGB original image.
        geometry: where the model's patches lie on the image.
        patch_sets: patch ids to mask, one array per image.
        score_images: see the module docstring.
        fill: how masked patches are filled (see ``utils.patch_utils.mask_boxes``).
        chunk: images per call, >= 1.
        seed: seed of the "noise" fill, the same for every image so only the mask changes.
    Returns:
        (sets,) or (sets, targets) float64.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    slots: dict[tuple[int, ...], int] = {}
    set_slots = [slots.setdefault(tuple(sorted(patch_ids.tolist())), len(slots)) for patch_ids in patch_sets]
    unique_sets = list(slots)
    scores = []
    for first in range(0, len(unique_sets), chunk):
        images = [
            mask_patches(image, geometry, list(patch_ids), fill, seed=seed)
            for patch_ids in unique_sets[first : first + chunk]
        ]
        scores.append(np.asarray(score_images(images), dtype=np.float64))
    return np.concatenate(scores)[set_slots]


def curves_by_order(
    image: Image.Image,
    geometry: ImageGeometry,
    orders: Sequence[np.ndarray],
    score_images: ScoreImages,
    *,
    direction: Direction = "deletion",
    fill: FillMode | Colour = "black",
    steps: int | None = None,
    chunk: int = SCORE_CHUNK,
    seed: int = 0,
) -> list[Curve]:
    """One deletion (or insertion) curve per patch order, all images scored in one chunked stream.

    Args:
        orders: patch ids most relevant first, one (patches,) array per curve.
        direction, fill, steps, chunk, seed: see ``step_counts`` and ``score_masked_images``.
    """
    counts = step_counts(geometry.patch_count, steps)
    patch_sets = [patch_set for order in orders for patch_set in masked_patch_sets(order, counts, direction)]
    scores = score_masked_images(image, geometry, patch_sets, score_images, fill=fill, chunk=chunk, seed=seed)
    scores = scores.reshape(len(orders), len(counts), *scores.shape[1:])
    fractions = counts / geometry.patch_count
    # The unmasked image is the first deletion step and the last insertion step.
    unmasked_step = 0 if direction == "deletion" else -1
    return [Curve(direction, fractions, order_scores, order_scores[unmasked_step]) for order_scores in scores]


def finite_mean(values) -> float | None:
    """Mean over finite values; None (JSON null) when there are none."""
    finite = [value for value in values if np.isfinite(value)]
    return float(np.mean(finite)) if finite else None


def ratio_interval(
    numerators: Sequence[float],
    denominators: Sequence[float],
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(numerators) / sum(denominators), resampling the
    units (scenes) with replacement: how far a ratio of mean AUCs could move on another sample
    of scenes. Words of one scene share its image, so the scene, not the word, is the unit.

    Args:
        numerators, denominators: one sum per unit (e.g. a scene's map and random AUCs), >= 1 unit.
        level: the interval's coverage, in (0, 1).
        resamples: bootstrap samples, >= 1.
        seed: seeds the resampling.
    Returns:
        (low, high).
    """
    top, bottom = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if not top.size or top.shape != bottom.shape:
        raise ValueError(f"need equal, non-empty numerators and denominators, got {top.shape} and {bottom.shape}")
    picks = np.random.default_rng(seed).integers(0, top.size, size=(resamples, top.size))
    ratios = top[picks].sum(axis=1) / bottom[picks].sum(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """Mean of raw scores over curves of the same direction and steps (random orders)."""
    first = curves[0]
    scores = np.mean([curve.scores for curve in curves], axis=0)
    reference = np.mean([curve.reference for curve in curves], axis=0)
    return Curve(first.direction, first.fractions, scores, reference)


def random_curve(
    image: Image.Image,
    geometry: ImageGeometry,
    score_images: ScoreImages,
    *,
    direction: Direction = "deletion",
    random_orders: int = RANDOM_ORDERS,
    seed: int = 0,
    **curve_options,
) -> Curve:
    """The random-order baseline: mean of ``random_orders`` curves of random patch orders.

    With several targets per image (shape (images, targets)) one baseline serves them all.

    Args:
        random_orders: permutations averaged, >= 1.
        seed: seeds the orders (and the "noise" fill).
        curve_options: fill, steps, chunk of ``curves_by_order``.
    """
    orders = random_patch_orders(geometry.patch_count, random_orders, seed)
    return mean_curve(
        curves_by_order(image, geometry, orders, score_images, direction=direction, seed=seed, **curve_options)
    )


def measure_curves(
    image: Image.Image,
    geometry: ImageGeometry,
    cam_patches: np.ndarray,
    score_images: ScoreImages,
    *,
    fill: FillMode | Colour = "black",
    steps: int | None = None,
    chunk: int = SCORE_CHUNK,
    random_orders: int = RANDOM_ORDERS,
    seed: int = 0,
) -> CurveSet:
    """Deletion and insertion curves of a heatmap and of ``random_orders`` random orders.

    Args:
        image: RGB original image.
        geometry: where the model's patches lie on the image.
        cam_patches: (patches,) heatmap deciding the order.
        score_images: see the module docstring.
        fill, steps, chunk: see ``curves_by_order``.
        random_orders: random permutations averaged into the baseline, >= 1.
        seed: seeds the random orders and the "noise" fill.
    """
    options = dict(fill=fill, steps=steps, chunk=chunk, seed=seed)
    curves = {}
    for direction in ("deletion", "insertion"):
        (curves[direction],) = curves_by_order(
            image, geometry, [patch_order(cam_patches)], score_images, direction=direction, **options
        )
        curves[f"random_{direction}"] = random_curve(
            image, geometry, score_images, direction=direction, random_orders=random_orders, **options
        )
    return CurveSet(**curves)


def rank_layers(
    image: Image.Image,
    geometry: ImageGeometry,
    cam_patch_stack: np.ndarray,
    score_images: ScoreImages,
    layer_names: Sequence[str],
    **curve_options,
) -> LayerRanking:
    """Deletion AUC of every layer's map; the lowest is the most faithful layer.

    Args:
        cam_patch_stack: (layers, patches) maps of one word.
        layer_names: (layers,) labels.
        curve_options: fill, steps, chunk, seed of ``curves_by_order``.
    """
    orders = [patch_order(cam_patches) for cam_patches in cam_patch_stack]
    curves = curves_by_order(image, geometry, orders, score_images, direction="deletion", **curve_options)
    deletion_auc = np.array([curve.auc for curve in curves])
    per_layer = deletion_auc.reshape(len(curves), -1).mean(axis=1)
    return LayerRanking(tuple(layer_names), deletion_auc, int(np.nanargmin(per_layer)))


def boxes_mask(boxes_image: Sequence[Box], image_size: tuple[int, int]) -> np.ndarray:
    """(height, width) bool, True inside any of the boxes (image pixels)."""
    width, height = image_size
    inside = np.zeros((height, width), dtype=bool)
    for box in boxes_image:
        inside[max(box.y0, 0) : max(box.y1, 0), max(box.x0, 0) : max(box.x1, 0)] = True
    return inside


def pointing_game(
    cam_patches: np.ndarray,
    geometry: ImageGeometry,
    boxes_image: Sequence[Box],
    tolerance_patches: float = 1.0,
) -> float:
    """Whether the heatmap's peak falls inside any box grown by ``tolerance_patches`` patches.

    Args:
        cam_patches: (patches,) heatmap.
        geometry: maps the patches onto the image.
        boxes_image: the object's boxes in image pixels (several instances count as one target).
        tolerance_patches: margin around each box in patches (the finest view's, in image pixels
            on each axis).
    Returns:
        1.0 for a hit, 0.0 for a miss or a constant map (it points nowhere), NaN when the map has
        no finite value.
    """
    cam_image = geometry.cam_to_image(cam_patches)  # (H, W), NaN outside the views
    if not np.isfinite(cam_image).any():
        return math.nan
    if np.nanmax(cam_image) == np.nanmin(cam_image):
        return 0.0
    peak_y, peak_x = np.unravel_index(np.nanargmax(cam_image), cam_image.shape)
    patch_width, patch_height = geometry.finest_patch_image
    margin_x, margin_y = tolerance_patches * patch_width, tolerance_patches * patch_height
    # Pixel centres, so a peak on a box's last row or column counts as inside it.
    x, y = peak_x + 0.5, peak_y + 0.5
    hit = any(
        box.x0 - margin_x <= x < box.x1 + margin_x and box.y0 - margin_y <= y < box.y1 + margin_y
        for box in boxes_image
    )
    return float(hit)


def box_mass(cam_patches: np.ndarray, geometry: ImageGeometry, boxes_image: Sequence[Box]) -> float:
    """Share of the heatmap's positive mass inside the boxes (energy pointing game), 0 to 1.

    Args: as ``pointing_game``. Returns NaN when the map has no positive mass.
    """
    cam_image = geometry.cam_to_image(cam_patches)  # (H, W)
    positive = np.clip(np.nan_to_num(cam_image, nan=0.0), 0.0, None)
    total = positive.sum(dtype=np.float64)
    if total <= 0:
        return math.nan
    return float(positive[boxes_mask(boxes_image, geometry.image_size)].sum(dtype=np.float64) / total)


def region_schedule(patch_count: int, max_share: float = REGION_MAX_SHARE) -> list[int]:
    """Patch counts tried by ``find_removal_region``: 1, 2, 3, 4, 6, 9, ... up to ``max_share`` of the grid."""
    limit = max(1, math.floor(max_share * patch_count))
    counts = [1]
    while counts[-1] < limit:
        counts.append(min(limit, max(counts[-1] + 1, math.floor(counts[-1] * REGION_SCHEDULE_GROWTH))))
    return counts


def find_removal_region(
    image: Image.Image,
    geometry: ImageGeometry,
    cam_patches: np.ndarray,
    word: str,
    caption_words: CaptionWords,
    *,
    fill: FillMode | Colour = "black",
    max_share: float = REGION_MAX_SHARE,
    seed: int = 0,
) -> RemovalRegion:
    """The smallest k such that masking the heatmap's top-k patches removes ``word`` from the caption.

    Search: k grows along ``region_schedule`` until a caption loses the word, then a binary
    search between the last failing and the first removing k (this assumes that within that
    gap, masking more never brings the word back). "Removed" means the word occurs fewer times
    than in the unmasked caption, so in "a red circle and a red square" removing one red object
    counts.

    Args:
        image: RGB original image.
        geometry: where the model's patches lie on the image.
        cam_patches: (patches,) heatmap of the word.
        word: a word of the unmasked image's caption.
        caption_words: see the module docstring.
        fill: how masked patches are filled.
        max_share: largest share of the grid tried, (0, 1].
        seed: seed of the "noise" fill.
    Raises:
        ValueError: the unmasked caption does not contain ``word``.
    """
    original_count = caption_words(image).count(word)
    if original_count == 0:
        raise ValueError(f"the caption of the unmasked image does not contain {word!r}")
    order = patch_order(cam_patches)
    tried: dict[int, tuple[str, ...]] = {}

    def removes(count: int) -> bool:
        masked = mask_patches(image, geometry, order[:count].tolist(), fill, seed=seed)
        tried[count] = tuple(caption_words(masked))
        return tried[count].count(word) < original_count

    failing, removing = 0, None
    for count in region_schedule(geometry.patch_count, max_share):
        if removes(count):
            removing = count
            break
        failing = count
    if removing is not None:
        while removing - failing > 1:
            middle = (failing + removing) // 2
            failing, removing = (failing, middle) if removes(middle) else (middle, removing)
    final = failing if removing is None else removing
    patch_ids = tuple(int(patch_id) for patch_id in order[:final])
    boxes = [geometry.patch_box_image(patch_id) for patch_id in patch_ids]
    share = float(boxes_mask(boxes, image.size).mean())
    return RemovalRegion(word, removing is not None, patch_ids, share, tried[final], len(tried) + 1)


def rank_values(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing their average rank (as scipy's rankdata)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="stable")
    _, first_index, counts = np.unique(values[order], return_index=True, return_counts=True)
    average_ranks = first_index + (counts + 1) / 2  # 1-based mean of positions first..first+count-1
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(average_ranks, counts)
    return ranks


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation of two same-shape arrays over positions finite in both; NaN if constant."""
    first = np.asarray(first, dtype=np.float64).ravel()
    second = np.asarray(second, dtype=np.float64).ravel()
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {first.shape} vs {second.shape}")
    finite = np.isfinite(first) & np.isfinite(second)
    first_ranks, second_ranks = rank_values(first[finite]), rank_values(second[finite])
    first_ranks -= first_ranks.mean()
    second_ranks -= second_ranks.mean()
    denominator = math.sqrt(float((first_ranks**2).sum() * (second_ranks**2).sum()))
    if denominator == 0:
        return math.nan
    return float((first_ranks * second_ranks).sum() / denominator)


def compare_maps(before: np.ndarray, after: np.ndarray, threshold: float = HIGH_CORRELATION) -> SanityCheck:
    """Sanity check of a map against the same map from a model with re-randomised top layers.

    Args:
        before: (rows, columns) map from the trained model.
        after: same shape, from the randomised copy.
        threshold: correlation above which the map is flagged, in (-1, 1).
    """
    correlation = spearman(before, after)
    return SanityCheck(correlation, bool(correlation > threshold))


def separation_auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """Area under the ROC curve of a score telling positives from negatives: the chance that a
    random positive scores above a random negative (ties count half); None without both."""
    positive, negative = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    if not positive.size or not negative.size:
        return None
    above = (positive[:, None] > negative[None, :]).mean()
    tied = (positive[:, None] == negative[None, :]).mean()
    return float(above + tied / 2)
