"""Faithfulness of word heatmaps on the shapes world, where every object's box is known.

On held-out scenes (EVAL_SEEDS from --seed on) that the demo captioner describes exactly, every
colour and shape word is explained with every method at every layer and scored: pointing game
and box mass against its object's box, and deletion AUC (patches filled with the background)
against random orders. Causal checks per object: painting the object's box with the
background must change the caption into the caption of the scene without that object
(``causal_removal``); painting a same-size box of empty background must change nothing
(``control_unchanged``). A model-randomisation sanity check runs on the first scenes.

    python bench/faithfulness.py --scenes 200 --seed 0 --json bench/results/faithfulness.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.analysis import randomised_copy, word_scorer  # noqa: E402
from models.blip_explainer import DEFAULT_METHOD, METHODS, BlipExplainer, Caption  # noqa: E402
from models.clip_explainer import ClipExplainer  # noqa: E402
from models.loading import torch_threads  # noqa: E402
from utils.metrics import (  # noqa: E402
    HIGH_CORRELATION,
    box_mass,
    compare_maps,
    curves_by_order,
    finite_mean,
    patch_order,
    pointing_game,
    random_curve,
)
from utils.patch_utils import Box  # noqa: E402
from utils.shapes_world import (  # noqa: E402
    COLOURS,
    EVAL_SEEDS,
    SHAPES,
    Scene,
    caption_distractors,
    generate_scene,
    paint_box,
    remove_object,
)

CLIP_CANDIDATES = 10
DELETION_STEPS = 16
SCORE_CHUNK = 64
SANITY_SCENES = 10
RANDOMISED_LAYERS = 2
CONTROL_TRIES = 200
CONTROL_MARGIN = 2


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
    # (method, layer name, "colour" or "shape") -> metric name -> values
    maps: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    # method -> Spearman correlations, trained vs randomised, deepest layer
    sanity: dict = field(default_factory=lambda: defaultdict(list))


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
    blip: BlipExplainer,
    clip: ClipExplainer | None,
    seed: int,
    methods: Sequence[str],
    tally: Tally,
    steps: int,
    randomised: BlipExplainer | None,
) -> None:
    """Add one scene's measurements to ``tally``."""
    scene = generate_scene(seed)
    caption = blip.caption(scene.image)
    exact = caption.text == scene.caption
    tally.caption_exact.append(float(exact))
    if clip is not None:
        texts = [scene.caption, *caption_distractors(scene, CLIP_CANDIDATES - 1, np.random.default_rng(seed))]
        tally.clip_top1.append(float(np.argmax(clip.similarity(scene.image, texts).probabilities) == 0))
    if not exact or not scene.objects:
        return
    measure_causal(blip, scene, [word.text for word in caption.words], tally, seed)
    cases = word_objects(scene, [word.text for word in caption.words])
    indices = [index for index, _, _ in cases]
    boxes = [[Box(*scene.objects[slot].box)] for _, _, slot in cases]
    score_words = word_scorer(blip, caption, indices)  # (images, words)
    curve_options = dict(fill=scene.background, steps=steps, chunk=SCORE_CHUNK)
    random_deletion = random_curve(scene.image, blip.geometry, score_words, **curve_options)
    tally.random_deletion_auc.extend(random_deletion.auc.tolist())
    keys, orders = [], []
    for method in methods:
        for column, word_maps in enumerate(blip.explain(scene.image, caption, indices, method)):
            kind = cases[column][1]
            for layer_name, cam_grid in zip(word_maps.layer_names, word_maps.cam_grid, strict=True):
                metrics = tally.maps[method, layer_name, kind]
                metrics["pointing_game"].append(pointing_game(cam_grid, blip.geometry, scene.image.size, boxes[column]))
                metrics["box_mass"].append(box_mass(cam_grid, blip.geometry, scene.image.size, boxes[column]))
                keys.append((method, layer_name, kind, column))
                orders.append(patch_order(cam_grid))
    # Every map of every word in one chunked stream; each image is scored for all words at once.
    curves = curves_by_order(scene.image, blip.geometry, orders, score_words, **curve_options)
    for (method, layer_name, kind, column), curve in zip(keys, curves, strict=True):
        tally.maps[method, layer_name, kind]["deletion_auc"].append(float(curve.auc[column]))
    if randomised is not None:
        measure_sanity(blip, randomised, scene, caption, indices, methods, tally)


def measure_causal(blip: BlipExplainer, scene: Scene, words: list[str], tally: Tally, seed: int) -> None:
    """Remove each object (must yield the caption without it) and paint a same-size control box."""
    rng = np.random.default_rng(seed)
    for slot, item in enumerate(scene.objects):
        without = remove_object(scene, slot)
        regenerated = blip.caption(without.image)
        tally.causal_removal.append(float(regenerated.text == without.caption))
        new_words = [word.text for word in regenerated.words]
        for word in (item.colour, item.shape):
            tally.causal_word_dropped.append(float(new_words.count(word) == words.count(word) - 1))
        box = control_box(scene, (item.box[2] - item.box[0], item.box[3] - item.box[1]), rng)
        if box is None:
            tally.controls_skipped += 1
            continue
        painted = paint_box(scene.image, (box.x0, box.y0, box.x1, box.y1), scene.background)
        tally.control_unchanged.append(float(blip.caption(painted).text == scene.caption))


def measure_sanity(
    blip: BlipExplainer,
    randomised: BlipExplainer,
    scene: Scene,
    caption: Caption,
    indices: list[int],
    methods: Sequence[str],
    tally: Tally,
) -> None:
    """Spearman correlation of each word's map at the method's default layer, trained model vs randomised copy."""
    for method in methods:
        layer = blip.default_layer(method)
        trained = blip.explain(scene.image, caption, indices, method)
        random = randomised.explain(scene.image, caption, indices, method)
        for before, after in zip(trained, random, strict=True):
            tally.sanity[method].append(compare_maps(before.cam_grid[layer], after.cam_grid[layer]).correlation)


def summarise(tally: Tally, blip: BlipExplainer, methods: Sequence[str]) -> dict:
    """The JSON results: headline numbers for DEFAULT_METHOD at its default layer, then per layer."""
    per_layer: dict = {}
    for method in methods:
        per_layer[method] = {}
        for layer_name in blip.layer_names(method):
            colour, shape = tally.maps[method, layer_name, "colour"], tally.maps[method, layer_name, "shape"]
            per_layer[method][layer_name] = {
                "words": len(colour["pointing_game"]) + len(shape["pointing_game"]),
                **{
                    metric: finite_mean(colour[metric] + shape[metric])
                    for metric in ("pointing_game", "box_mass", "deletion_auc")
                },
                "pointing_game_colour": finite_mean(colour["pointing_game"]),
                "pointing_game_shape": finite_mean(shape["pointing_game"]),
            }
    default_method = DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0]
    default_layer = blip.layer_names(default_method)[blip.default_layer(default_method)]
    headline = per_layer[default_method][default_layer]
    return {
        "caption_exact": finite_mean(tally.caption_exact),
        "clip_top1": finite_mean(tally.clip_top1),
        "default": {"method": default_method, "layer": default_layer},
        "pointing_game": headline["pointing_game"],
        "box_mass": headline["box_mass"],
        "deletion_auc": headline["deletion_auc"],
        "random_deletion_auc": finite_mean(tally.random_deletion_auc),
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
        "per_layer": per_layer,
        "sanity": {
            method: {
                "spearman": finite_mean(values),
                "barely_depends": finite_mean([float(value > HIGH_CORRELATION) for value in values]),
            }
            for method, values in tally.sanity.items()
        },
    }


def run_benchmark(
    blip: BlipExplainer,
    clip: ClipExplainer | None,
    seeds: Sequence[int],
    methods: Sequence[str] = METHODS,
    steps: int = DELETION_STEPS,
    sanity_scenes: int = SANITY_SCENES,
) -> dict:
    """Measure every scene of ``seeds`` and return ``summarise``'s results (CLIP skipped when None)."""
    tally = Tally()
    randomised = randomised_copy(blip, RANDOMISED_LAYERS, seed=0) if sanity_scenes else None
    for count, seed in enumerate(seeds):
        measure_scene(blip, clip, seed, methods, tally, steps, randomised if count < sanity_scenes else None)
    return summarise(tally, blip, methods)


def print_table(results: dict) -> None:
    """Headline numbers, then one row per method and layer."""
    counts = results["counts"]
    print(f"{counts['scenes']} scenes, {counts['objects']} objects, {counts['words']} words")
    for key in ("caption_exact", "clip_top1", "pointing_game", "box_mass", "deletion_auc", "random_deletion_auc",
                "causal_removal", "causal_word_dropped", "control_unchanged"):  # fmt: skip
        value = results[key]
        print(f"{key:22s} {'n/a' if value is None else f'{value:.3f}'}")
    width = max(len(layer_name) for layers in results["per_layer"].values() for layer_name in layers)
    print(f"\n{'method':16s} {'layer':{width}s} {'PG':>6s} {'PG col':>7s} {'PG shp':>7s} {'mass':>6s} {'del AUC':>8s}")
    for method, layers in results["per_layer"].items():
        for layer_name, metrics in layers.items():
            cells = [metrics[key] for key in
                     ("pointing_game", "pointing_game_colour", "pointing_game_shape", "box_mass", "deletion_auc")]
            text = " ".join(f"{'-' if value is None else f'{value:.3f}':>7s}" for value in cells)
            print(f"{method:16s} {layer_name:{width}s} {text}")
    for method, sanity in results["sanity"].items():
        print(f"sanity {method:16s} Spearman trained vs randomised top layers: {sanity['spearman']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="first index into EVAL_SEEDS")
    parser.add_argument("--steps", type=int, default=DELETION_STEPS, help="deletion curve steps")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sanity-scenes", type=int, default=SANITY_SCENES)
    parser.add_argument("--blip", default="shapes-demo")
    parser.add_argument("--clip", default="shapes-demo")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: see evaluate.torch_threads)")
    arguments = parser.parse_args()
    started = time.perf_counter()
    blip = BlipExplainer.from_pretrained(arguments.blip, device="cpu")
    clip = ClipExplainer.from_pretrained(arguments.clip, device="cpu")
    seeds = list(EVAL_SEEDS[arguments.seed : arguments.seed + arguments.scenes])
    with torch_threads(arguments.threads):
        results = run_benchmark(blip, clip, seeds, arguments.methods, arguments.steps, arguments.sanity_scenes)
    results.update(
        command=" ".join(["python", *sys.argv]),
        seeds={"first": seeds[0], "last": seeds[-1], "count": len(seeds)},
        seconds=round(time.perf_counter() - started, 1),
        torch_threads=arguments.threads,
    )
    print_table(results)
    print(f"\n{results['seconds']} s")
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
