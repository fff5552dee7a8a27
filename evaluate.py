"""Measure how faithful a captioner's word heatmaps are, over a whole folder of images.

For every content word of every caption: its probability, deletion and insertion AUC of the
heatmap against random patch orders, the fewest top patches whose masking removes the word,
and, with COCO-format boxes, the pointing game. Resumable: images already in the CSV are skipped.

    python evaluate.py --model shapes-demo --images DIR [--annotations COCO.json] --out DIR

With ``--engine ray`` the images are spread over a pool of Ray Data workers (this machine's cores,
or a cluster's nodes with ``--address``), each holding the model once; this process writes every
image's rows as they arrive. Ray (requirements-ray.txt) is imported only then.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pickle
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from models.analysis import word_evidence
from models.evaluation import ImageScores, MapScores, MeasureSettings, measure_image
from models.explainer import Caption, CaptionerExplainer, ExplanationTooLargeError
from models.families import load_captioner
from models.loading import ModelUnavailableError, torch_threads
from utils.image_utils import COUNTERFACTUALS, ImageLoadError, load_image
from utils.metrics import RANDOM_ORDERS, finite_mean
from utils.patch_utils import FILL_MODES, Box
from utils.plots import mean_curves_figure, pointing_game_figure

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
    "removal_share", "pointing_game", "box_mass", "visual_reliance",
)  # fmt: skip
NUMERIC_COLUMNS = CSV_COLUMNS[5:]
FIGURE_DPI = 100
ENGINES = ("sequential", "ray")
RAY_ONLY_FLAGS = ("address", "workers", "gpus_per_worker")


@dataclass(frozen=True)
class ImageRecord:
    """One image to evaluate.

    Args:
        name: its path relative to --images, as the results name it.
        path: its file (absolute for Ray: every worker must be able to read it).
        boxes: category -> boxes in the image's pixels, from --annotations ({} without).
    """

    name: str
    path: Path
    boxes: dict[str, list[Box]] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageResult:
    """What evaluating one image gave: its CSV rows and curve records, or why it was skipped.

    Args:
        worker: "host:pid" of the process that evaluated it.
        seconds: time spent on it there.
    """

    name: str
    rows: list[dict]
    curves: list[dict]
    skipped: str = ""
    worker: str = ""
    seconds: float = 0.0


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-demo", help='"shapes-demo", a local folder or a hub id')
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--annotations", type=Path, help="COCO-format JSON with boxes for the pointing game")
    parser.add_argument("--words", nargs="+", help="evaluate only these caption words (default: content words)")
    parser.add_argument("--method", help="an explanation method of the model's family (default: the family's)")
    parser.add_argument("--layer", default="default", help='1-based layer, "default", "last" or "all"')
    parser.add_argument("--fill", default="mean", choices=FILL_MODES, help="what masked patches become")
    parser.add_argument(
        "--counterfactual", default=COUNTERFACTUALS[0], choices=COUNTERFACTUALS,
        help="the images that show nothing, for each word's visual reliance (README)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, help="curve steps (default: min(patches, 32))")
    parser.add_argument("--random-orders", type=int, default=RANDOM_ORDERS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads, per Ray worker with --engine ray")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine", default="sequential", choices=ENGINES, help="ray: a pool of Ray Data workers")
    parser.add_argument("--address", help='Ray cluster to join ("auto", "HOST:6379"; default: start one here)')
    parser.add_argument("--workers", type=int, help="Ray workers, each holding the model once (default: 1)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs each Ray worker reserves (default: 0)")
    arguments = parser.parse_args(argv)
    given_ray_flags = [flag for flag in RAY_ONLY_FLAGS if getattr(arguments, flag) is not None]
    if arguments.engine != "ray" and given_ray_flags:
        parser.error(f"--{given_ray_flags[0].replace('_', '-')} needs --engine ray")
    if arguments.workers is not None and arguments.workers < 1:
        parser.error("--workers must be at least 1")
    if arguments.gpus_per_worker is not None and arguments.gpus_per_worker < 0:
        parser.error("--gpus-per-worker must not be negative")
    return arguments


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
    explainer: CaptionerExplainer,
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
    word_categories = [category_of(caption.words[index].text, categories) for index in indices]
    word_boxes = [boxes.get(category, []) if category else [] for category in word_categories]
    layers = chosen_layers(
        arguments.layer, explainer.layer_names(arguments.method), explainer.default_layer(arguments.method)
    )
    settings = MeasureSettings(
        fill=arguments.fill, steps=arguments.steps, random_orders=arguments.random_orders, insertion=True, removal=True
    )
    scores = measure_image(explainer, image, caption, indices, word_boxes, [arguments.method], settings, layers)
    reliance = word_evidence(explainer, image, caption, arguments.counterfactual).reliance[indices]
    rows = [
        csv_row(image_name, word_categories[map_scores.slot], map_scores, scores, float(reliance[map_scores.slot]))
        for map_scores in scores.maps
    ]
    curves = [curve_record(image_name, map_scores, scores) for map_scores in scores.maps]
    return rows, curves


def csv_row(
    image_name: str, category: str | None, map_scores: MapScores, scores: ImageScores, visual_reliance: float
) -> dict:
    """One CSV row: a word's map at one layer (pointing game and box mass blank without boxes),
    and the word's visual reliance (log p with the image minus with the counterfactual)."""
    region, slot = map_scores.removal, map_scores.slot
    return {
        "image": image_name, "word": map_scores.word, "category": category or "",
        "layer": map_scores.layer_name, "method": map_scores.method,
        "probability": math.exp(map_scores.log_p),
        "deletion_auc": float(map_scores.deletion.auc), "insertion_auc": float(map_scores.insertion.auc),
        "random_deletion_auc": float(scores.random_deletion.auc[slot]),
        "random_insertion_auc": float(scores.random_insertion.auc[slot]),
        "deletion_log_p_auc": float(map_scores.deletion.log_p_auc),
        "k_to_remove": region.patch_count, "removed": int(region.removed), "removal_share": region.image_share,
        "pointing_game": "" if map_scores.pointing_game is None else map_scores.pointing_game,
        "box_mass": "" if map_scores.box_mass is None else map_scores.box_mass,
        "visual_reliance": visual_reliance,
    }  # fmt: skip


def curve_record(image_name: str, map_scores: MapScores, scores: ImageScores) -> dict:
    """One line of curves.jsonl: a word's curves at one layer beside its random baselines (p / p(unmasked))."""
    slot = map_scores.slot
    return {
        "image": image_name, "word": map_scores.word, "layer": map_scores.layer_name,
        "fractions": map_scores.deletion.fractions.tolist(),
        "deletion": map_scores.deletion.relative_scores.tolist(),
        "insertion": map_scores.insertion.relative_scores.tolist(),
        "random_deletion": scores.random_deletion.relative_scores[:, slot].tolist(),
        "random_insertion": scores.random_insertion.relative_scores[:, slot].tolist(),
    }  # fmt: skip


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
            "visual_reliance": finite_mean(row["visual_reliance"] for row in layer_rows),
            "pointing_game_by_category": {name: finite_mean(values) for name, values in sorted(by_category.items())},
        }
    return summary


def image_files(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder``, sorted; the loader decides what is an image."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))


def load_explainer(arguments: argparse.Namespace) -> CaptionerExplainer:
    """The captioner of --model on --device; fills in ``arguments.method`` with the family's default.

    Raises:
        ModelUnavailableError: the model does not load, or its family has no such --method.
    """
    explainer = load_captioner(arguments.model, device=arguments.device)
    arguments.method = arguments.method or explainer.default_method
    if arguments.method not in explainer.methods:
        raise ModelUnavailableError(f"--method must be one of {', '.join(explainer.methods)} for this model")
    return explainer


def evaluate_record(
    explainer: CaptionerExplainer, record: ImageRecord, categories: Sequence[str], arguments: argparse.Namespace
) -> ImageResult:
    """Evaluate one image file; a file that is no readable image comes back skipped, with the reason.

    Both engines evaluate every image with this function, so their rows are the same.
    """
    started = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        image = load_image(record.path.read_bytes())
    except (ImageLoadError, OSError) as error:
        return ImageResult(record.name, [], [], skipped=str(error), worker=worker)
    try:
        rows, curves = evaluate_image(explainer, image, record.name, categories, record.boxes, arguments)
    except ExplanationTooLargeError as error:  # this image's sequence is too long for the free memory
        return ImageResult(record.name, [], [], skipped=str(error), worker=worker)
    return ImageResult(record.name, rows, curves, worker=worker, seconds=time.perf_counter() - started)


def sequential_results(
    records: Sequence[ImageRecord], categories: Sequence[str], arguments: argparse.Namespace
) -> Iterator[ImageResult]:
    """Evaluate the images one after another in this process."""
    explainer = load_explainer(arguments)
    for record in records:
        yield evaluate_record(explainer, record, categories, arguments)


class RayImageEvaluator:
    """A Ray Data worker: loads the explainer once, then evaluates the images of each batch.

    Records come and results go pickled, one per row: boxes and rows are nested Python objects
    that Arrow has no type for, and pickling keeps every number bit for bit. A model that does
    not load comes back as its ModelUnavailableError in place of each result, so that the run
    stops with its one-line message instead of a dead worker's traceback.
    """

    def __init__(self, arguments: argparse.Namespace, categories: Sequence[str]):
        if arguments.threads:
            torch.set_num_threads(arguments.threads)
        self.arguments = arguments
        self.categories = categories
        self.explainer: CaptionerExplainer | None = None
        self.unavailable: ModelUnavailableError | None = None
        try:
            self.explainer = load_explainer(arguments)
        except ModelUnavailableError as error:
            self.unavailable = error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [
            self.unavailable
            if self.explainer is None
            else evaluate_record(self.explainer, pickle.loads(record), self.categories, self.arguments)
            for record in batch["record"]
        ]
        return {"result": np.array([pickle.dumps(result) for result in results], dtype=object)}


def ray_results(
    records: Sequence[ImageRecord], categories: Sequence[str], arguments: argparse.Namespace
) -> Iterator[ImageResult]:
    """Evaluate the images on a pool of Ray Data workers; results come in the order they finish.

    Joins the cluster at --address, or starts Ray on this machine (and stops it afterwards) when
    none is running. A worker that dies is restarted and its images are evaluated again
    (Ray Data's actor pools retry by default); only the results that come back here are written.

    Raises:
        ModelUnavailableError: as ``load_explainer``, in the workers.
    """
    import ray  # Only --engine ray needs Ray (requirements-ray.txt): the sequential path never imports it.

    if not records:
        return
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=arguments.address)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # this process shows the whole run's
        # One image per block: each result streams back when its image is done, workers share the
        # images evenly, and a worker that dies loses one image's work, not a block's. Each worker
        # holds one image at a time: an image is seconds of work, so queueing a second one behind
        # it gains nothing and, at the end of the run, leaves a worker idle while another still
        # has images waiting.
        images = ray.data.from_items([{"record": pickle.dumps(record)} for record in records],
                                     override_num_blocks=len(records))  # fmt: skip
        evaluated = images.map_batches(
            RayImageEvaluator,
            fn_constructor_kwargs={"arguments": arguments, "categories": categories},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=arguments.workers or 1, max_tasks_in_flight_per_actor=1),
            num_cpus=arguments.threads or 1,
            num_gpus=arguments.gpus_per_worker or 0,
        )
        for row in evaluated.iter_rows():
            result = pickle.loads(row["result"])
            if isinstance(result, ModelUnavailableError):
                raise result
            yield result
    finally:
        if started_here:
            ray.shutdown()


@dataclass
class WorkerLoad:
    """Images one worker evaluated and the seconds it spent on them."""

    images: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"images": self.images, "seconds": round(self.seconds, 2),
                "images_per_s": round(self.images / self.seconds, 3) if self.seconds else None}  # fmt: skip


def write_results(
    out: Path, results: Iterable[ImageResult], image_count: int
) -> tuple[list[dict], dict[str, WorkerLoad]]:
    """Append each image's rows as its result arrives, with a progress bar over the whole run.

    Returns the skipped images (name and reason) and each worker's load.
    """
    skipped, loads = [], defaultdict(WorkerLoad)
    with tqdm(total=image_count, desc="images", unit="image", file=sys.stderr) as progress:
        for result in results:
            if result.skipped:
                skipped.append({"image": result.name, "reason": result.skipped})
                progress.write(f"skipped {result.name}: {result.skipped}", file=sys.stderr)
            else:
                append_records(out, result.rows, result.curves)
                loads[result.worker].images += 1
                loads[result.worker].seconds += result.seconds
            progress.update()
    return skipped, loads


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; returns the process exit status."""
    arguments = parse_arguments(argv)
    with torch_threads(arguments.threads):
        return evaluate_folder(arguments, argv)


def evaluate_folder(arguments: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Evaluate every image of the folder not yet in the CSV, then write the summary and plots."""
    started = time.perf_counter()
    arguments.out.mkdir(parents=True, exist_ok=True)
    categories, boxes_by_image = load_annotations(arguments.annotations)
    done = {row["image"] for row in read_rows(arguments.out / CSV_NAME)}
    names = {path: path.relative_to(arguments.images).as_posix() for path in image_files(arguments.images)}
    records = [
        ImageRecord(name, path.resolve(), boxes_by_image.get(name, {}))
        for path, name in names.items()
        if name not in done
    ]
    engine = ray_results if arguments.engine == "ray" else sequential_results
    try:
        skipped, loads = write_results(arguments.out, engine(records, categories, arguments), len(records))
    except ModelUnavailableError as error:
        print(error, file=sys.stderr)
        return 2
    rows = read_rows(arguments.out / CSV_NAME)
    summary = {
        "command": " ".join(["python", "evaluate.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": arguments.model,
        "method": arguments.method or next((row["method"] for row in rows), None),
        "fill": arguments.fill,
        "engine": arguments.engine,
        "images_evaluated": len({row["image"] for row in rows}),
        "images_resumed": len(names) - len(records),
        "words_evaluated": len(rows),
        "skipped_images": skipped,
        "workers": {worker: load.summary() for worker, load in sorted(loads.items())},
        **summarise(rows),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (arguments.out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    curve_path = arguments.out / CURVES_NAME
    if curve_path.is_file():
        curve_records = [json.loads(line) for line in curve_path.read_text().splitlines()]
        if curve_records:  # none when no image had a word to measure
            mean_curves_figure(curve_records).savefig(arguments.out / "curves.png", dpi=FIGURE_DPI)
    if any(metrics["pointing_game_by_category"] for metrics in summary["per_layer"].values()):
        pointing_game_figure(summary["per_layer"]).savefig(arguments.out / "pointing_game.png", dpi=FIGURE_DPI)
    for worker, load in summary["workers"].items():
        print(f"worker {worker}: {load['images']} images in {load['seconds']} s ({load['images_per_s']} images/s)")
    print(f"{len(rows)} words from {summary['images_evaluated']} images, {len(skipped)} skipped; "
          f"results in {arguments.out}{os.sep}")  # fmt: skip
    return 0


if __name__ == "__main__":
    # Ray workers unpickle records and results by module name: run as the module "evaluate",
    # whose classes they can import, not as "__main__", which is another program in a worker.
    import evaluate

    raise SystemExit(evaluate.main())
