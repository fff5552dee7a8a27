"""Measure how faithful a captioner's word heatmaps are, over a whole folder of images.

For every content word of every caption: its probability, deletion and insertion AUC of the
heatmap against random patch orders, the fewest top patches whose masking removes the word,
and, with COCO-format boxes, the pointing game. Resumable: images already in the CSV are skipped.

    python evaluate.py --model shapes-demo --images DIR [--annotations COCO.json] --out DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from models.analysis import caption_word_reader, word_scorer
from models.blip_explainer import DEFAULT_METHOD, METHODS, BlipExplainer, Caption
from models.loading import ModelUnavailableError, torch_threads
from utils.image_utils import ImageLoadError, load_image
from utils.metrics import (
    RANDOM_ORDERS,
    box_mass,
    curves_by_order,
    find_removal_region,
    finite_mean,
    patch_order,
    pointing_game,
    random_curve,
)
from utils.patch_utils import FILL_MODES, Box

STOP_WORDS = frozenset({
    "a", "an", "the", "and", "or", "of", "on", "in", "at", "to", "with", "by", "for", "from", "is", "are",
    "was", "were", "be", "it", "its", "this", "that", "there", "some", "near", "next", "up", "down", "over",
    "under", "while", "his", "her", "their",
})  # fmt: skip
# Caption word -> annotation category. Small on purpose: exact category names match anyway.
CATEGORY_SYNONYMS = {
    "person": ("man", "men", "woman", "women", "people", "person", "boy", "girl", "child", "children", "player"),
    "dog": ("dog", "dogs", "puppy"),
    "cat": ("cat", "cats", "kitten"),
    "car": ("car", "cars"),
    "circle": ("circle",),
    "square": ("square",),
    "triangle": ("triangle",),
}
CSV_NAME, CURVES_NAME, SUMMARY_NAME = "words.csv", "curves.jsonl", "summary.json"
CSV_COLUMNS = (
    "image", "word", "category", "layer", "method", "probability", "deletion_auc", "insertion_auc",
    "random_deletion_auc", "random_insertion_auc", "deletion_log_p_auc", "k_to_remove", "removed",
    "removal_share", "pointing_game", "box_mass",
)  # fmt: skip
NUMERIC_COLUMNS = CSV_COLUMNS[5:]


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-demo", help='"shapes-demo", a local folder or a hub id')
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--annotations", type=Path, help="COCO-format JSON with boxes for the pointing game")
    parser.add_argument("--words", nargs="+", help="evaluate only these caption words (default: content words)")
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    parser.add_argument("--layer", default="default", help='1-based layer, "default", "last" or "all"')
    parser.add_argument("--fill", default="mean", choices=FILL_MODES, help="what masked patches become")
    parser.add_argument("--steps", type=int, help="curve steps (default: min(patches, 32))")
    parser.add_argument("--random-orders", type=int, default=RANDOM_ORDERS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def selected_word_indices(caption: Caption, words: Sequence[str] | None) -> list[int]:
    """Indices of the caption words to evaluate: those in ``words``, else every non-stop word."""
    if words:
        wanted = {word.lower() for word in words}
        return [index for index, word in enumerate(caption.words) if word.text in wanted]
    return [index for index, word in enumerate(caption.words) if word.text not in STOP_WORDS and word.text.isalpha()]


def category_of(word: str, categories: Sequence[str]) -> str | None:
    """The annotation category a caption word names (by name or CATEGORY_SYNONYMS), or None."""
    for category in categories:
        if word == category.lower() or word in CATEGORY_SYNONYMS.get(category.lower(), ()):
            return category
    return None


def load_annotations(path: Path | None) -> tuple[list[str], dict[str, dict[str, list[Box]]]]:
    """Category names and, per image file name, the boxes of each category (COCO format)."""
    if path is None:
        return [], {}
    coco = json.loads(path.read_text())
    category_names = {category["id"]: category["name"] for category in coco["categories"]}
    file_names = {image["id"]: image["file_name"] for image in coco["images"]}
    boxes: dict[str, dict[str, list[Box]]] = defaultdict(lambda: defaultdict(list))
    for annotation in coco["annotations"]:
        x, y, width, height = annotation["bbox"]
        box = Box(math.floor(x), math.floor(y), math.ceil(x + width), math.ceil(y + height))
        boxes[file_names[annotation["image_id"]]][category_names[annotation["category_id"]]].append(box)
    return list(category_names.values()), boxes


def chosen_layers(layer: str, layer_names: Sequence[str], default_layer: int) -> list[int]:
    """0-based layer indices from the --layer flag."""
    if layer == "default":
        return [default_layer]
    if layer == "all":
        return list(range(len(layer_names)))
    if layer == "last":
        return [len(layer_names) - 1]
    if not layer.isdigit() or not 1 <= int(layer) <= len(layer_names):
        raise SystemExit(f"--layer must be 1..{len(layer_names)}, 'default', 'last' or 'all', got {layer!r}")
    return [int(layer) - 1]


def evaluate_image(
    explainer: BlipExplainer,
    image,
    image_name: str,
    categories: Sequence[str],
    boxes: dict[str, list[Box]],
    arguments: argparse.Namespace,
) -> tuple[list[dict], list[dict]]:
    """CSV rows and curve records of one image's selected words."""
    caption = explainer.caption(image)
    indices = selected_word_indices(caption, arguments.words)
    if not indices:
        return [], []
    geometry = explainer.geometry
    curve_options = dict(fill=arguments.fill, steps=arguments.steps, seed=0)
    all_words = word_scorer(explainer, caption, indices)
    # One random baseline per direction serves every word: the masked images do not depend on it.
    random_deletion, random_insertion = (
        random_curve(image, geometry, all_words, direction=direction, random_orders=arguments.random_orders,
                     **curve_options)
        for direction in ("deletion", "insertion")
    )  # fmt: skip
    maps = explainer.explain(image, caption, indices, arguments.method)
    layers = chosen_layers(arguments.layer, maps[0].layer_names, explainer.default_layer(arguments.method))
    rows, curves = [], []
    for slot, (index, word_maps) in enumerate(zip(indices, maps, strict=True)):
        word = caption.words[index].text
        category = category_of(word, categories)
        word_boxes = boxes.get(category, []) if category else []
        one_word = word_scorer(explainer, caption, [index])
        for layer in layers:
            cam_grid = word_maps.cam_grid[layer]
            order = [patch_order(cam_grid)]
            (deletion,) = curves_by_order(image, geometry, order, one_word, direction="deletion", **curve_options)
            (insertion,) = curves_by_order(image, geometry, order, one_word, direction="insertion", **curve_options)
            region = find_removal_region(
                image, geometry, cam_grid, word, caption_word_reader(explainer), fill=arguments.fill
            )
            rows.append({
                "image": image_name, "word": word, "category": category or "",
                "layer": word_maps.layer_names[layer], "method": arguments.method,
                "probability": math.exp(word_maps.score),
                "deletion_auc": float(deletion.auc[0]), "insertion_auc": float(insertion.auc[0]),
                "random_deletion_auc": float(random_deletion.auc[slot]),
                "random_insertion_auc": float(random_insertion.auc[slot]),
                "deletion_log_p_auc": float(deletion.log_p_auc[0]),
                "k_to_remove": region.patch_count, "removed": int(region.removed),
                "removal_share": region.image_share,
                "pointing_game": pointing_game(cam_grid, geometry, image.size, word_boxes) if word_boxes else "",
                "box_mass": box_mass(cam_grid, geometry, image.size, word_boxes) if word_boxes else "",
            })  # fmt: skip
            curves.append({
                "image": image_name, "word": word, "layer": word_maps.layer_names[layer],
                "fractions": deletion.fractions.tolist(),
                "deletion": deletion.relative_scores[:, 0].tolist(),
                "insertion": insertion.relative_scores[:, 0].tolist(),
                "random_deletion": random_deletion.relative_scores[:, slot].tolist(),
                "random_insertion": random_insertion.relative_scores[:, slot].tolist(),
            })  # fmt: skip
    return rows, curves


def read_rows(csv_path: Path) -> list[dict]:
    """Rows of an existing CSV (numbers as floats, blanks as NaN); [] when there is none."""
    if not csv_path.is_file():
        return []
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for column in NUMERIC_COLUMNS:
            row[column] = float(row[column]) if row[column] != "" else math.nan
    return rows


def append_records(out: Path, rows: list[dict], curves: list[dict]) -> None:
    """Append one image's rows and curves, so an interrupted run keeps every finished image."""
    csv_path = out / CSV_NAME
    new_file = not csv_path.is_file()
    with csv_path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    with (out / CURVES_NAME).open("a") as handle:
        handle.writelines(json.dumps(curve) + "\n" for curve in curves)


def summarise(rows: list[dict]) -> dict:
    """Mean metrics of CSV rows, per layer and per category."""
    by_layer = defaultdict(list)
    for row in rows:
        by_layer[row["layer"]].append(row)
    summary = {"per_layer": {}}
    for layer, layer_rows in by_layer.items():
        by_category = defaultdict(list)
        for row in layer_rows:
            if row["category"]:
                by_category[row["category"]].append(row["pointing_game"])
        removed = [row for row in layer_rows if row["removed"] == 1]
        summary["per_layer"][layer] = {
            "words": len(layer_rows),
            **{column: finite_mean(row[column] for row in layer_rows) for column in NUMERIC_COLUMNS[:6]},
            "deletion_beats_random": finite_mean(
                float(row["deletion_auc"] < row["random_deletion_auc"]) for row in layer_rows
            ),
            "removal_rate": finite_mean(row["removed"] for row in layer_rows),
            "mean_k_to_remove": finite_mean(row["k_to_remove"] for row in removed),
            "pointing_game": finite_mean(row["pointing_game"] for row in layer_rows),
            "box_mass": finite_mean(row["box_mass"] for row in layer_rows),
            "pointing_game_by_category": {name: finite_mean(values) for name, values in sorted(by_category.items())},
        }
    return summary


def plot_curves(curve_records: list[dict], path: Path) -> None:
    """Mean deletion and insertion curves of the heatmap (per layer) against random orders."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 2, figsize=(10, 4))
    fractions = curve_records[0]["fractions"]
    records = [record for record in curve_records if record["fractions"] == fractions]
    for axis, direction in zip(axes, ("deletion", "insertion"), strict=True):
        for layer in sorted({record["layer"] for record in records}):
            mean = np.mean([record[direction] for record in records if record["layer"] == layer], axis=0)
            axis.plot(fractions, mean, label=f"heatmap, {layer}")
        axis.plot(fractions, np.mean([record[f"random_{direction}"] for record in records], axis=0),
                  "k--", label="random order")  # fmt: skip
        axis.set(title=f"{direction} ({len(records)} curves)", xlabel="share of patches " +
                 ("masked" if direction == "deletion" else "restored"), ylabel="p / p(unmasked image)")  # fmt: skip
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def plot_pointing_game(summary: dict, path: Path) -> None:
    """Bar chart of the pointing game per category, one group of bars per layer."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(8, 4))
    layers = summary["per_layer"]
    width = 0.8 / len(layers)
    for slot, (layer, metrics) in enumerate(layers.items()):
        by_category = {name: value for name, value in metrics["pointing_game_by_category"].items() if value is not None}
        positions = np.arange(len(by_category)) + slot * width
        axis.bar(positions, list(by_category.values()), width, label=layer)
        axis.set_xticks(positions, list(by_category))
    axis.set(ylim=(0, 1), ylabel="pointing game (hit rate)", title="Pointing game per category")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def image_files(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder``, sorted; the loader decides what is an image."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; returns the process exit status."""
    arguments = parse_arguments(argv)
    with torch_threads(arguments.threads):
        return evaluate_folder(arguments, argv)


def evaluate_folder(arguments: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Evaluate every image of the folder, then write the summary and plots."""
    started = time.perf_counter()
    arguments.out.mkdir(parents=True, exist_ok=True)
    categories, boxes_by_image = load_annotations(arguments.annotations)
    try:
        explainer = BlipExplainer.from_pretrained(arguments.model, device=arguments.device)
    except ModelUnavailableError as error:
        print(error, file=sys.stderr)
        return 2
    done = {row["image"] for row in read_rows(arguments.out / CSV_NAME)}
    skipped, resumed = [], 0
    for path in tqdm(image_files(arguments.images), desc="images", unit="image", file=sys.stderr):
        name = path.relative_to(arguments.images).as_posix()
        if name in done:
            resumed += 1
            continue
        try:
            image = load_image(path.read_bytes())
        except (ImageLoadError, OSError) as error:
            skipped.append({"image": name, "reason": str(error)})
            tqdm.write(f"skipped {name}: {error}", file=sys.stderr)
            continue
        rows, curves = evaluate_image(explainer, image, name, categories, boxes_by_image.get(name, {}), arguments)
        append_records(arguments.out, rows, curves)
    rows = read_rows(arguments.out / CSV_NAME)
    summary = {
        "command": " ".join(["python", "evaluate.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": arguments.model,
        "method": arguments.method,
        "fill": arguments.fill,
        "images_evaluated": len({row["image"] for row in rows}),
        "images_resumed": resumed,
        "words_evaluated": len(rows),
        "skipped_images": skipped,
        **summarise(rows),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (arguments.out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    curve_path = arguments.out / CURVES_NAME
    if curve_path.is_file():
        plot_curves([json.loads(line) for line in curve_path.read_text().splitlines()], arguments.out / "curves.png")
    if any(metrics["pointing_game_by_category"] for metrics in summary["per_layer"].values()):
        plot_pointing_game(summary, arguments.out / "pointing_game.png")
    print(f"{len(rows)} words from {summary['images_evaluated']} images, {len(skipped)} skipped; "
          f"results in {arguments.out}{os.sep}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
