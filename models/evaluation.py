"""The measuring pipeline shared by ``evaluate.py`` (any folder of images) and
``bench/faithfulness.py`` (the shapes world, where every object's box is known).

``measure_image`` scores every map of a caption's chosen words: pointing game and box mass
against the word's boxes, deletion (and insertion) curves against random patch orders, and the
smallest region whose masking removes the word. On the shapes world, ``measure_shapes_scenes``
adds the causal checks (removing an object must remove its words; painting empty background
must change nothing), a model-randomisation sanity check and the summary that the benchmark
prints and writes.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field

import numpy as np
from PIL import Image

from models.analysis import caption_word_reader, word_evidence_against, word_scorer
from models.clip_explainer import ClipExplainer
from models.explainer import Caption, CaptionerExplainer, WordMaps
from utils.image_utils import COUNTERFACTUALS
from utils.metrics import (
    HIGH_CORRELATION,
    RANDOM_ORDERS,
    SCORE_CHUNK,
    Curve,
    Direction,
    RemovalRegion,
    ScoreImages,
    box_first_order,
    box_mass,
    boxes_mask,
    compare_maps,
    curves_by_order,
    find_removal_region,
    finite_mean,
    patch_order,
    pointing_game,
    random_curve,
    ratio_interval,
    separation_auc,
)
from utils.patch_utils import Box, Colour, FillMode, ImageGeometry
from utils.shapes_world import (
    COLOURS,
    SHAPES,
    Scene,
    caption_distractors,
    generate_scene,
    grammar_forced,
    paint_box,
    remove_object,
)


@dataclass(frozen=True)
class MeasureSettings:
    """What is measured of each map, and how its curves are drawn.

    Args:
        fill: what masked patches become (a fill mode or an RGB colour).
        steps: curve steps; None for min(patches, utils.metrics.MAX_STEPS).
        chunk: masked images scored per forward pass, >= 1.
        random_orders: random patch orders averaged into the baselines, >= 1.
        insertion: draw insertion curves too (deletion curves are always drawn).
        removal: search each map's smallest region whose masking removes its word.
    """

    fill: FillMode | Colour = "black"
    steps: int | None = None
    chunk: int = SCORE_CHUNK
    random_orders: int = RANDOM_ORDERS
    insertion: bool = False
    removal: bool = False

    def curve_options(self) -> dict:
        """The keyword arguments that ``utils.metrics``' curve functions take from these settings."""
        return {"fill": self.fill, "steps": self.steps, "chunk": self.chunk}


@dataclass(frozen=True)
class MapScores:
    """How faithful one word's map at one layer is.

    Args:
        method: key of the captioner's ``methods``.
        word: the explained word.
        slot: the word's place among the measured words (its column in the random baselines).
        layer_name: the map's label.
        score: the explained target (log p of the word, or its contrast with the runner-up).
        pointing_game, box_mass: against the word's boxes; None when it has none.
        pointing_game_strict: the peak patch overlaps the word's boxes (``pointing_game_strict``);
            None when it has none.
        deletion: scores (steps,) of the word as the map's patches are masked, most relevant first.
        insertion: likewise as they are restored; None unless measured.
        removal: the smallest removing region; None unless measured.
    """

    method: str
    word: str
    slot: int
    layer_name: str
    score: float
    pointing_game: float | None
    box_mass: float | None
    pointing_game_strict: float | None
    deletion: Curve
    insertion: Curve | None
    removal: RemovalRegion | None

    @property
    def log_p(self) -> float:
        """The word's log p on the unmasked image, whatever the map's target: where its deletion curve starts."""
        return float(self.deletion.reference)


@dataclass(frozen=True)
class ImageScores:
    """One image's measurements.

    Args:
        random_deletion: random-order baseline, scores (steps, words) of the measured words.
        random_insertion: likewise for insertion; None unless measured.
        maps: one per method, word and layer, in that nesting order.
    """

    random_deletion: Curve
    random_insertion: Curve | None
    maps: tuple[MapScores, ...]


@dataclass(frozen=True)
class MapEntry:
    """Which map of which measured word: ``word_maps.cam_patches[layer]``."""

    method: str
    slot: int
    layer: int
    word_maps: WordMaps

    @property
    def cam_patches(self) -> np.ndarray:  # (patches,)
        return self.word_maps.cam_patches[self.layer]


def measure_image(
    captioner: CaptionerExplainer,
    image: Image.Image,
    caption: Caption,
    word_indices: Sequence[int],
    word_boxes: Sequence[Sequence[Box]],
    methods: Sequence[str],
    settings: MeasureSettings,
    layers: Sequence[int] | None = None,
) -> ImageScores:
    """Score every map of the given caption words, for each method at each chosen layer.

    Args:
        captioner: the explainer that wrote ``caption``.
        image: RGB image the caption was generated for.
        caption: from ``captioner.caption(image)``.
        word_indices: which of ``caption.words`` to measure, >= 1 of them.
        word_boxes: per measured word, its boxes in image pixels ([] for none).
        methods: keys of ``captioner.methods``.
        settings: what to measure and how.
        layers: indices of each method's maps to measure; None for all of them.
    """
    score_words = word_scorer(captioner, caption, word_indices)  # images -> (images, words)
    geometry = captioner.image_geometry(image.size)
    # One random baseline per direction serves every word: the masked images do not depend on it.
    baseline = dict(random_orders=settings.random_orders, **settings.curve_options())
    random_deletion = random_curve(image, geometry, score_words, direction="deletion", **baseline)
    random_insertion = (
        random_curve(image, geometry, score_words, direction="insertion", **baseline)
        if settings.insertion
        else None
    )
    entries = [
        MapEntry(method, slot, layer, word_maps)
        for method in methods
        for slot, word_maps in enumerate(captioner.explain(image, caption, word_indices, method))
        for layer in (range(len(word_maps.layer_names)) if layers is None else layers)
    ]
    deletions = map_curves(image, geometry, entries, score_words, "deletion", settings)
    insertions = (
        map_curves(image, geometry, entries, score_words, "insertion", settings)
        if settings.insertion
        else [None] * len(entries)
    )
    maps = tuple(
        score_map(captioner, image, entry, word_boxes[entry.slot], deletion, insertion, settings)
        for entry, deletion, insertion in zip(entries, deletions, insertions, strict=True)
    )
    return ImageScores(random_deletion, random_insertion, maps)


def map_curves(
    image: Image.Image,
    geometry: ImageGeometry,
    entries: Sequence[MapEntry],
    score_words: ScoreImages,
    direction: Direction,
    settings: MeasureSettings,
) -> list[Curve]:
    """Each map's curve of its own word: scores (steps,).

    Every map's masked images go through one chunked stream, each image scored for all words at
    once, so a patch set that several maps share is scored once.
    """
    orders = [patch_order(entry.cam_patches) for entry in entries]
    return slot_curves(image, geometry, orders, [entry.slot for entry in entries], score_words, direction, settings)


def slot_curves(
    image: Image.Image,
    geometry: ImageGeometry,
    orders: Sequence[np.ndarray],
    slots: Sequence[int],
    score_words: ScoreImages,
    direction: Direction,
    settings: MeasureSettings,
) -> list[Curve]:
    """One curve per patch order, each of the measured word in ``slots`` at the same place:
    scores (steps,). All orders' masked images go through one chunked stream."""
    curves = curves_by_order(image, geometry, orders, score_words, direction=direction, **settings.curve_options())
    return [
        Curve(curve.direction, curve.fractions, curve.scores[:, slot], curve.reference[slot])
        for curve, slot in zip(curves, slots, strict=True)
    ]


def score_map(
    captioner: CaptionerExplainer,
    image: Image.Image,
    entry: MapEntry,
    boxes: Sequence[Box],
    deletion: Curve,
    insertion: Curve | None,
    settings: MeasureSettings,
) -> MapScores:
    """One map's scores: pointing game and box mass when its word has boxes, removal region if asked."""
    geometry, cam_patches, word_maps = captioner.image_geometry(image.size), entry.cam_patches, entry.word_maps
    removal = (
        find_removal_region(image, geometry, cam_patches, word_maps.word, caption_word_reader(captioner),
                            fill=settings.fill)
        if settings.removal else None
    )  # fmt: skip
    return MapScores(
        method=entry.method,
        word=word_maps.word,
        slot=entry.slot,
        layer_name=word_maps.layer_names[entry.layer],
        score=word_maps.score,
        pointing_game=pointing_game(cam_patches, geometry, boxes) if boxes else None,
        box_mass=box_mass(cam_patches, geometry, boxes) if boxes else None,
        pointing_game_strict=pointing_game_strict(cam_patches, geometry, boxes) if boxes else None,
        deletion=deletion,
        insertion=insertion,
        removal=removal,
    )


def pointing_game_strict(cam_patches: np.ndarray, geometry: ImageGeometry, boxes_image: Sequence[Box]) -> float:
    """Whether the heatmap's peak *patch* overlaps any of the boxes: no tolerance, no upsampling.

    ``utils.metrics.pointing_game`` looks at the peak pixel of the upsampled map and forgives a
    patch of distance; here a patch holding the map's highest value must cover part of the
    object's box, so a map that points next to the object scores a miss. Every patch that ties
    for the peak counts: a map made at a coarser resolution than the patches (Qwen2-VL's
    language-model attention gives one value per merged 2x2 block) peaks on a whole block.

    Args:
        cam_patches: (patches,) heatmap.
        geometry: maps the patches onto the image.
        boxes_image: the object's boxes in image pixels.
    Returns:
        1.0 for a hit, 0.0 for a miss or a constant map, NaN when the map has no finite value.
    """
    if not np.isfinite(cam_patches).any():
        return math.nan
    peak_value = np.nanmax(cam_patches)
    if peak_value == np.nanmin(cam_patches):
        return 0.0
    peaks = set(np.flatnonzero(cam_patches == peak_value).tolist())
    return float(any(peaks.intersection(geometry.patches_in_box(box)) for box in boxes_image))


# ---------------------------------------------------------------- the shapes world

CLIP_CANDIDATES = 10
DELETION_STEPS = 16
SHAPES_SCORE_CHUNK = 64
SANITY_SCENES = 10
RANDOMISED_LAYERS = 2
CONTROL_TRIES = 200
CONTROL_MARGIN = 2


@dataclass(frozen=True)
class SceneSums:
    """One scene's headline numbers summed over its measured words: how many, how many the
    headline map's strict pointing game hits, and deletion AUC by that map, by random orders
    and by the box-first reference."""

    words: int
    strict_hits: float
    deletion: float
    random_deletion: float
    box_first_deletion: float


@dataclass
class Tally:
    """Per-word, per-object and per-scene measurements collected over the scenes."""

    caption_exact: list[float] = field(default_factory=list)
    clip_top1: list[float] = field(default_factory=list)
    causal_removal: list[float] = field(default_factory=list)
    causal_word_dropped: list[float] = field(default_factory=list)
    control_unchanged: list[float] = field(default_factory=list)
    controls_skipped: int = 0
    random_deletion_auc: list[float] = field(default_factory=list)
    box_first_deletion_auc: list[float] = field(default_factory=list)
    # Per scene, the headline map's sums over its measured words (the bootstrap's unit).
    headline_scenes: list[SceneSums] = field(default_factory=list)
    # (method, layer name, "colour" or "shape") -> metric name -> values
    maps: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    # method -> Spearman correlations, trained vs randomised, deepest layer
    sanity: dict = field(default_factory=lambda: defaultdict(list))
    # counterfactual -> word group (see RELIANCE_GROUPS) -> reliances
    reliance: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    # "mistake" (a word of an object the scene lacks) or "correct" -> flag name -> 0/1 values
    flags: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))


def word_objects(scene: Scene, words: Sequence[str]) -> list[tuple[int, str, int]]:
    """(word index, "colour" or "shape", object index) of each colour and shape word.

    An exact caption reads "a <colour> <shape> and a ..." over the objects left to right,
    the order of ``scene.objects``.
    """
    content = [(index, word) for index, word in enumerate(words) if word in COLOURS or word in SHAPES]
    return [
        (index, "colour" if word in COLOURS else "shape", slot // 2) for slot, (index, word) in enumerate(content)
    ]


def control_box(scene: Scene, size: tuple[int, int], rng: np.random.Generator) -> Box | None:
    """A box of ``size`` (width, height) on empty background, or None when none is found."""
    width, height = size
    image_width, image_height = scene.image.size
    for _ in range(CONTROL_TRIES):
        x0 = int(rng.integers(0, image_width - width + 1))
        y0 = int(rng.integers(0, image_height - height + 1))
        box = Box(x0, y0, x0 + width, y0 + height)
        if all(
            box.x1 + CONTROL_MARGIN <= ox0 or ox1 + CONTROL_MARGIN <= box.x0
            or box.y1 + CONTROL_MARGIN <= oy0 or oy1 + CONTROL_MARGIN <= box.y0
            for ox0, oy0, ox1, oy1 in (item.box for item in scene.objects)
        ):  # fmt: skip
            return box
    return None


def measure_scene(
    captioner: CaptionerExplainer,
    clip: ClipExplainer | None,
    seed: int,
    methods: Sequence[str],
    tally: Tally,
    steps: int,
    randomised: CaptionerExplainer | None,
    scene_for_seed: Callable[[int], Scene] = generate_scene,
) -> None:
    """Add one scene's measurements to ``tally``; ``scene_for_seed`` draws the scene of ``seed``."""
    scene = scene_for_seed(seed)
    caption = captioner.caption(scene.image)
    exact = caption.text == scene.caption
    tally.caption_exact.append(float(exact))
    measure_reliance(captioner, scene, caption, tally)
    if clip is not None:
        texts = [scene.caption, *caption_distractors(scene, CLIP_CANDIDATES - 1, np.random.default_rng(seed))]
        tally.clip_top1.append(float(np.argmax(clip.similarity(scene.image, texts).probabilities) == 0))
    if not exact or not scene.objects:
        return
    measure_causal(captioner, scene, [word.text for word in caption.words], tally, seed)
    cases = word_objects(scene, [word.text for word in caption.words])
    indices = [index for index, _, _ in cases]
    boxes = [[Box(*scene.objects[slot].box)] for _, _, slot in cases]
    settings = MeasureSettings(fill=scene.background, steps=steps, chunk=SHAPES_SCORE_CHUNK)
    scores = measure_image(captioner, scene.image, caption, indices, boxes, methods, settings)
    random_auc = scores.random_deletion.auc
    box_first_auc = box_first_deletion(captioner, scene, caption, cases, settings, seed)
    tally.random_deletion_auc.extend(random_auc.tolist())
    tally.box_first_deletion_auc.extend(box_first_auc.tolist())
    headline_key = headline_map(captioner, methods)
    headline = [map_scores for map_scores in scores.maps if (map_scores.method, map_scores.layer_name) == headline_key]
    tally.headline_scenes.append(SceneSums(
        words=len(headline),
        strict_hits=sum(map_scores.pointing_game_strict for map_scores in headline),
        deletion=sum(float(map_scores.deletion.auc) for map_scores in headline),
        random_deletion=float(random_auc.sum()),
        box_first_deletion=float(box_first_auc.sum()),
    ))  # fmt: skip
    for map_scores in scores.maps:
        metrics = tally.maps[map_scores.method, map_scores.layer_name, cases[map_scores.slot][1]]
        metrics["pointing_game"].append(map_scores.pointing_game)
        metrics["pointing_game_strict"].append(map_scores.pointing_game_strict)
        metrics["box_mass"].append(map_scores.box_mass)
        metrics["deletion_auc"].append(float(map_scores.deletion.auc))
    if randomised is not None:
        measure_sanity(captioner, randomised, scene, caption, indices, methods, tally)


def box_first_deletion(
    captioner: CaptionerExplainer,
    scene: Scene,
    caption: Caption,
    cases: Sequence[tuple[int, str, int]],
    settings: MeasureSettings,
    seed: int,
) -> np.ndarray:
    """Deletion AUC of each measured word (``word_objects``' cases) by the reference order of
    ground truth, its object's box first (``utils.metrics.box_first_order``): (words,)."""
    geometry = captioner.image_geometry(scene.image.size)
    rng = np.random.default_rng(seed)
    orders = [
        box_first_order(geometry.patches_in_box(Box(*scene.objects[slot].box)), geometry.patch_count, rng)
        for _, _, slot in cases
    ]
    score_words = word_scorer(captioner, caption, [index for index, _, _ in cases])
    curves = slot_curves(scene.image, geometry, orders, range(len(cases)), score_words, "deletion", settings)
    return np.array([float(curve.auc) for curve in curves])


def headline_map(captioner: CaptionerExplainer, methods: Sequence[str]) -> tuple[str, str]:
    """(method, layer name) of the summary's headline: the family's default method at its
    default layer, or the first measured method's default layer when the default is not measured."""
    method = captioner.default_method if captioner.default_method in methods else methods[0]
    return method, captioner.layer_names(method)[captioner.default_layer(method)]


def headline_intervals(tally: Tally) -> dict:
    """95% bootstrap intervals over scenes of the headline map's strict pointing game and of
    its deletion AUC as a share of random orders'; that share for the map and for the
    box-first reference. None without measured scenes."""
    keys = ("pointing_game_strict_ci95", "deletion_ratio", "deletion_ratio_ci95", "box_first_deletion_ratio")
    if not tally.headline_scenes:
        return dict.fromkeys(keys)
    words, hits, deletion, random, box_first = (
        np.array(column, dtype=np.float64) for column in zip(*map(astuple, tally.headline_scenes), strict=True)
    )
    return dict(zip(keys, (
        list(ratio_interval(hits, words)),
        float(deletion.sum() / random.sum()),
        list(ratio_interval(deletion, random)),
        float(box_first.sum() / random.sum()),
    ), strict=True))  # fmt: skip


FUNCTION_WORDS = ("a", "and")
# The word groups whose reliance is compared. "forced" is the ground truth of the language prior:
# the words the caption grammar fixes from the words before them (shapes_world.grammar_forced).
# "function" is every "a" and "and": the first "a" (not "an") and each "and" (one more object)
# tell what the image shows, so only some of them are the prior's.
RELIANCE_GROUPS = ("object", "forced", "function")


def caption_object_words(scene: Scene, words: Sequence[str]) -> dict[str, list[int]]:
    """Indices of the caption's colour and shape words, split into those of objects the scene
    has ("correct") and those of objects it lacks ("mistake": a colour-shape pair said more often
    than the scene holds it)."""
    available = Counter((item.colour, item.shape) for item in scene.objects)
    split: dict[str, list[int]] = {"correct": [], "mistake": []}
    for index in range(len(words) - 1):
        pair = (words[index], words[index + 1])
        if pair[0] in COLOURS and pair[1] in SHAPES:
            kind = "correct" if available[pair] > 0 else "mistake"
            available[pair] -= 1
            split[kind] += [index, index + 1]
    return split


def measure_reliance(captioner: CaptionerExplainer, scene: Scene, caption: Caption, tally: Tally) -> None:
    """Visual reliance of every colour, shape and function word against each counterfactual;
    then, for the words of objects the caption gets right or wrong, whether the default
    counterfactual's reliance (under LANGUAGE_PRIOR_NATS) or the default map flags them: a map
    points at no object when no more of its mass lies on the scene's objects than a uniform map
    would put there (their share of the image)."""
    words = [word.text for word in caption.words]
    members = {  # group (RELIANCE_GROUPS) -> the indices of its words
        "object": [index for index, word in enumerate(words) if word in COLOURS + SHAPES],
        "forced": [index for index, forced in enumerate(grammar_forced(words)) if forced],
        "function": [index for index, word in enumerate(words) if word in FUNCTION_WORDS],
    }
    evidence = word_evidence_against(captioner, scene.image, caption, COUNTERFACTUALS)
    for kind_evidence in evidence:
        for group, indices in members.items():
            tally.reliance[kind_evidence.counterfactual][group].extend(kind_evidence.reliance[indices].tolist())
    split = caption_object_words(scene, words)
    indices = split["correct"] + split["mistake"]
    if not indices or not scene.objects:
        return
    method = captioner.default_method
    maps = captioner.explain(scene.image, caption, indices, method=method)
    geometry = captioner.image_geometry(scene.image.size)
    boxes = [Box(*item.box) for item in scene.objects]
    uniform_mass = boxes_mask(boxes, scene.image.size).mean()
    prior = evidence[0].from_prior  # the default counterfactual, first of COUNTERFACTUALS
    for index, word_maps in zip(indices, maps, strict=True):
        kind = "correct" if index in split["correct"] else "mistake"
        off_object = box_mass(word_maps.cam_patches[captioner.default_layer(method)], geometry, boxes) <= uniform_mass
        tally.flags[kind]["reliance"].append(float(prior[index]))
        tally.flags[kind]["box_mass"].append(float(off_object))
        tally.flags[kind]["either"].append(float(prior[index] or off_object))


def reliance_summary(tally: Tally) -> dict:
    """Per counterfactual, how well reliance tells colour and shape words from the words the
    grammar forces (the prior's) and from every "a" and "and"; and the shares of right and wrong
    object words that reliance or the map flags."""
    return {
        "separation": {
            kind: {
                "auc_object_vs_forced": separation_auc(groups["object"], groups["forced"]),
                "auc_object_vs_function": separation_auc(groups["object"], groups["function"]),
                **{f"{group}_words": len(groups[group]) for group in RELIANCE_GROUPS},
                **{f"median_{group}_nats": float(np.median(groups[group])) if groups[group] else None
                   for group in RELIANCE_GROUPS},
            }
            for kind, groups in tally.reliance.items()
        },
        "flagged": {
            kind: {"words": len(flags["either"]), **{name: finite_mean(values) for name, values in flags.items()}}
            for kind, flags in tally.flags.items()
        },
    }


def measure_causal(captioner: CaptionerExplainer, scene: Scene, words: list[str], tally: Tally, seed: int) -> None:
    """Remove each object (must yield the caption without it) and paint a same-size control box."""
    rng = np.random.default_rng(seed)
    for slot, item in enumerate(scene.objects):
        without = remove_object(scene, slot)
        regenerated = captioner.caption(without.image)
        tally.causal_removal.append(float(regenerated.text == without.caption))
        new_words = [word.text for word in regenerated.words]
        for word in (item.colour, item.shape):
            tally.causal_word_dropped.append(float(new_words.count(word) == words.count(word) - 1))
        box = control_box(scene, (item.box[2] - item.box[0], item.box[3] - item.box[1]), rng)
        if box is None:
            tally.controls_skipped += 1
            continue
        painted = paint_box(scene.image, (box.x0, box.y0, box.x1, box.y1), scene.background)
        tally.control_unchanged.append(float(captioner.caption(painted).text == scene.caption))


def measure_sanity(
    captioner: CaptionerExplainer,
    randomised: CaptionerExplainer,
    scene: Scene,
    caption: Caption,
    indices: list[int],
    methods: Sequence[str],
    tally: Tally,
) -> None:
    """Spearman correlation of each word's map at the method's default layer, trained model vs randomised copy."""
    for method in methods:
        layer = captioner.default_layer(method)
        trained = captioner.explain(scene.image, caption, indices, method)
        random = randomised.explain(scene.image, caption, indices, method)
        for before, after in zip(trained, random, strict=True):
            tally.sanity[method].append(compare_maps(before.cam_patches[layer], after.cam_patches[layer]).correlation)


def summarise_scenes(tally: Tally, captioner: CaptionerExplainer, methods: Sequence[str]) -> dict:
    """The benchmark's results: headline numbers for the family's default method and layer, then per layer."""
    per_layer: dict = {}
    for method in methods:
        per_layer[method] = {}
        for layer_name in captioner.layer_names(method):
            colour, shape = tally.maps[method, layer_name, "colour"], tally.maps[method, layer_name, "shape"]
            per_layer[method][layer_name] = {
                "words": len(colour["pointing_game"]) + len(shape["pointing_game"]),
                **{
                    metric: finite_mean(colour[metric] + shape[metric])
                    for metric in ("pointing_game", "pointing_game_strict", "box_mass", "deletion_auc")
                },
                "pointing_game_colour": finite_mean(colour["pointing_game"]),
                "pointing_game_shape": finite_mean(shape["pointing_game"]),
            }
    default_method, default_layer = headline_map(captioner, methods)
    headline = per_layer[default_method][default_layer]
    return {
        "caption_exact": finite_mean(tally.caption_exact),
        "clip_top1": finite_mean(tally.clip_top1),
        "default": {"method": default_method, "layer": default_layer},
        "pointing_game": headline["pointing_game"],
        "pointing_game_strict": headline["pointing_game_strict"],
        "box_mass": headline["box_mass"],
        "deletion_auc": headline["deletion_auc"],
        "random_deletion_auc": finite_mean(tally.random_deletion_auc),
        "box_first_deletion_auc": finite_mean(tally.box_first_deletion_auc),
        **headline_intervals(tally),
        "causal_removal": finite_mean(tally.causal_removal),
        "causal_word_dropped": finite_mean(tally.causal_word_dropped),
        "control_unchanged": finite_mean(tally.control_unchanged),
        "counts": {
            "scenes": len(tally.caption_exact),
            "objects": len(tally.causal_removal),
            "words": headline["words"],
            "controls": len(tally.control_unchanged),
            "controls_skipped": tally.controls_skipped,
        },
        "visual_reliance": reliance_summary(tally),
        "per_layer": per_layer,
        "sanity": {
            method: {
                "spearman": finite_mean(values),
                "barely_depends": finite_mean([float(value > HIGH_CORRELATION) for value in values]),
            }
            for method, values in tally.sanity.items()
        },
    }


def measure_shapes_scenes(
    captioner: CaptionerExplainer,
    clip: ClipExplainer | None,
    seeds: Sequence[int],
    methods: Sequence[str] | None = None,
    steps: int = DELETION_STEPS,
    sanity_scenes: int = SANITY_SCENES,
    scene_for_seed: Callable[[int], Scene] = generate_scene,
) -> dict:
    """Measure every scene of ``seeds`` and return ``summarise_scenes``'s results.

    Args:
        captioner: the explainer measured.
        clip: ranks each scene's true caption among distractors; None skips that.
        seeds: shapes-world scene seeds (held out from training: utils.shapes_world.EVAL_SEEDS).
        methods: keys of ``captioner.methods``; None for all of them.
        steps: deletion curve steps.
        sanity_scenes: how many of the first scenes get the model-randomisation check.
        scene_for_seed: seed -> its scene; the world the captioner was trained on (128 px
            squares by default; ``utils.shapes_world.generate_varied_scene`` for the decoder demo).
    """
    methods = list(methods or captioner.methods)
    tally = Tally()
    randomised = captioner.randomised_copy(RANDOMISED_LAYERS, seed=0) if sanity_scenes else None
    for count, seed in enumerate(seeds):
        sanity = randomised if count < sanity_scenes else None
        measure_scene(captioner, clip, seed, methods, tally, steps, sanity, scene_for_seed)
    return summarise_scenes(tally, captioner, methods)
