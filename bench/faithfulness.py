"""Faithfulness of word heatmaps on the shapes world, where every object's box is known.

On held-out scenes (EVAL_SEEDS from --seed on) that the demo captioner describes exactly, every
colour and shape word is explained with every method at every layer and scored: pointing game
(strict: the peak patch overlaps the object's box; and with one patch of tolerance around the
box, on the upsampled map) and box mass against its object's box, and deletion AUC (patches
filled with the background) against random orders and against the reference of ground truth,
the object's box first, in random order (what a map that knows only where the object is would
score). The headline strict pointing game and deletion ratio to random orders come with 95%
bootstrap intervals over scenes.
Causal checks per object: painting the object's box with the background must change the
caption into the caption of the scene without that object (``causal_removal``); painting a
same-size box of empty background must change nothing (``control_unchanged``). A
model-randomisation sanity check runs on the first scenes. The measuring is
``models.evaluation``'s, shared with ``evaluate.py``; this script prints and writes it.

    python bench/faithfulness.py --scenes 200 --seed 0 --json bench/results/faithfulness.json
    python bench/faithfulness.py --model shapes-demo-decoder --scenes 200 --json bench/results/faithfulness_decoder.json

The decoder-only demo (``shapes-demo-decoder``) is measured on the world it was trained on:
scenes of varied size and aspect ratio (``--world varied``); any other captioner on 128 px
squares unless ``--world`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from models.clip_explainer import ClipExplainer
from models.evaluation import DELETION_STEPS, SANITY_SCENES, measure_shapes_scenes
from models.families import load_captioner
from models.loading import SHAPES_DEMO_DECODER, torch_threads
from utils.shapes_world import EVAL_SEEDS, generate_scene, generate_varied_scene

# Scene seed -> scene, per world.
WORLDS = {"square": generate_scene, "varied": generate_varied_scene}


def print_table(results: dict) -> None:
    """Headline numbers, then one row per method and layer."""
    counts = results["counts"]
    print(f"{counts['scenes']} scenes, {counts['objects']} objects, {counts['words']} words")
    for key in ("caption_exact", "clip_top1", "pointing_game_strict", "pointing_game", "box_mass", "deletion_auc",
                "random_deletion_auc", "box_first_deletion_auc", "causal_removal", "causal_word_dropped",
                "control_unchanged"):  # fmt: skip
        value = results[key]
        print(f"{key:22s} {'n/a' if value is None else f'{value:.3f}'}")
    if results["deletion_ratio"] is not None:
        pointing_low, pointing_high = results["pointing_game_strict_ci95"]
        deletion_low, deletion_high = results["deletion_ratio_ci95"]
        print(f"95% intervals over scenes: pointing_game_strict {pointing_low:.3f} to {pointing_high:.3f}; "
              f"deletion / random {results['deletion_ratio']:.3f}, {deletion_low:.3f} to {deletion_high:.3f} "
              f"(box first {results['box_first_deletion_ratio']:.3f})")
    width = max(len(layer_name) for layers in results["per_layer"].values() for layer_name in layers)
    method_width = max(len(method) for method in results["per_layer"])
    header = " ".join(f"{name:>7s}" for name in ("PG str", "PG", "PG col", "PG shp", "mass", "del AUC"))
    print(f"\n{'method':{method_width}s} {'layer':{width}s} {header}")
    for method, layers in results["per_layer"].items():
        for layer_name, metrics in layers.items():
            cells = [metrics[key] for key in ("pointing_game_strict", "pointing_game", "pointing_game_colour",
                                              "pointing_game_shape", "box_mass", "deletion_auc")]
            text = " ".join(f"{'-' if value is None else f'{value:.3f}':>7s}" for value in cells)
            print(f"{method:{method_width}s} {layer_name:{width}s} {text}")
    for method, sanity in results["sanity"].items():
        print(f"sanity {method:{method_width}s} Spearman trained vs randomised top layers: {sanity['spearman']}")


def print_reliance(results: dict) -> None:
    """Visual reliance: colour and shape words against the words the grammar forces and against
    every "a" and "and", per counterfactual, and the shares of right and wrong object words it
    (or the default map) flags."""
    reliance = results["visual_reliance"]
    columns = {"AUC vs forced": "auc_object_vs_forced", "AUC vs a/and": "auc_object_vs_function",
               "median object": "median_object_nats", "median forced": "median_forced_nats",
               "median a/and": "median_function_nats"}  # fmt: skip
    print(f"\n{'counterfactual':15s} " + " ".join(f"{name:>14s}" for name in columns))
    for kind, separation in reliance["separation"].items():
        values = [(separation[key], 3 if key.startswith("auc") else 2) for key in columns.values()]
        text = " ".join(f"{'n/a' if value is None else f'{value:.{digits}f}':>14s}" for value, digits in values)
        print(f"{kind:15s} {text}")
    for kind, flagged in reliance["flagged"].items():
        shares = ", ".join(f"{name} {value:.2f}" for name, value in flagged.items() if name != "words")
        print(f"{kind} object words ({flagged['words']}): flagged by {shares}")


def check_scene_range(parser: argparse.ArgumentParser, seed: int, scenes: int) -> None:
    """Exit with a usage message unless --seed and --scenes pick at least one held-out scene, all inside EVAL_SEEDS."""
    held_out = len(EVAL_SEEDS)
    if scenes < 1:
        parser.error(f"--scenes must be at least 1, not {scenes}")
    if not 0 <= seed < held_out:
        parser.error(f"--seed must be from 0 to {held_out - 1} (the held-out scenes), not {seed}")
    if seed + scenes > held_out:
        parser.error(
            f"--seed {seed} with --scenes {scenes} reaches past the {held_out} held-out scenes; "
            f"use at most --scenes {held_out - seed} from this seed"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="first index into EVAL_SEEDS")
    parser.add_argument("--steps", type=int, default=DELETION_STEPS, help="deletion curve steps")
    parser.add_argument("--methods", nargs="+", help="methods of the captioner's family (default: all)")
    parser.add_argument("--sanity-scenes", type=int, default=SANITY_SCENES)
    parser.add_argument(
        "--model", "--captioner", "--blip", dest="captioner", default="shapes-demo",
        help='"shapes-demo", "shapes-demo-decoder", a folder or a hub id',
    )
    parser.add_argument("--world", choices=tuple(WORLDS), help="scenes: 128 px squares or varied sizes "
                        "(default: varied for shapes-demo-decoder, square otherwise)")
    parser.add_argument("--clip", default="shapes-demo")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: see models.loading.torch_threads)")
    arguments = parser.parse_args()
    check_scene_range(parser, arguments.seed, arguments.scenes)
    world = arguments.world or ("varied" if arguments.captioner == SHAPES_DEMO_DECODER else "square")
    started = time.perf_counter()
    captioner = load_captioner(arguments.captioner, device="cpu")
    unknown = set(arguments.methods or ()) - set(captioner.methods)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; this captioner offers {', '.join(captioner.methods)}")
    clip = ClipExplainer.from_pretrained(arguments.clip, device="cpu")
    seeds = list(EVAL_SEEDS[arguments.seed : arguments.seed + arguments.scenes])
    with torch_threads(arguments.threads):
        results = measure_shapes_scenes(
            captioner, clip, seeds, arguments.methods, arguments.steps, arguments.sanity_scenes, WORLDS[world]
        )
    results.update(
        command=" ".join(["python", *sys.argv]),
        seeds={"first": seeds[0], "last": seeds[-1], "count": len(seeds)},
        world=world,
        seconds=round(time.perf_counter() - started, 1),
        torch_threads=arguments.threads,
    )
    print_table(results)
    print_reliance(results)
    print(f"\n{results['seconds']} s")
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
