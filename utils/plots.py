"""Matplotlib figures for the app, built with the object API (pyplot's global state is not
thread-safe, and every browser session runs in its own thread)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from utils.metrics import CurveSet


def curves_figure(curves: CurveSet, word: str) -> Figure:
    """Deletion and insertion curves of a heatmap beside their random-order baselines.

    Args:
        curves: from ``utils.metrics.measure_curves`` for one word (one target).
        word: the explained word, for the title.
    """
    figure = Figure(figsize=(8, 3), layout="constrained")
    for axes, (by_map, by_random) in zip(
        figure.subplots(1, 2),
        [(curves.deletion, curves.random_deletion), (curves.insertion, curves.random_insertion)],
        strict=True,
    ):
        for curve, label, style in [(by_map, "by heatmap", "-"), (by_random, "random order", "--")]:
            axes.plot(curve.fractions, curve.relative_scores, style, label=f"{label} (AUC {float(curve.auc):.2f})")
        # parse_math off: a word such as "$x$" is model text, not LaTeX for matplotlib's mathtext.
        axes.set_title(f"{by_map.direction.capitalize()} of patches · “{word}”", parse_math=False)
        axes.set_xlabel("share of patches " + ("masked" if by_map.direction == "deletion" else "restored"))
        axes.set_ylabel("p / p(original image)")
        axes.legend(fontsize="small")
    return figure


def mean_curves_figure(curve_records: list[dict]) -> Figure:
    """Mean deletion and insertion curves of the heatmap (per layer) against random orders.

    Args:
        curve_records: lines of evaluate.py's curves.jsonl: "layer", "fractions" and, per
            direction, "deletion" / "random_deletion" (and insertion) p / p(unmasked image),
            one value per fraction. Records with other fractions than the first are left out.
    """
    figure = Figure(figsize=(10, 4), layout="tight")
    fractions = curve_records[0]["fractions"]
    records = [record for record in curve_records if record["fractions"] == fractions]
    for axes, direction in zip(figure.subplots(1, 2), ("deletion", "insertion"), strict=True):
        for layer in sorted({record["layer"] for record in records}):
            mean = np.mean([record[direction] for record in records if record["layer"] == layer], axis=0)
            axes.plot(fractions, mean, label=f"heatmap, {layer}")
        axes.plot(fractions, np.mean([record[f"random_{direction}"] for record in records], axis=0),
                  "k--", label="random order")  # fmt: skip
        axes.set(title=f"{direction} ({len(records)} curves)", xlabel="share of patches " +
                 ("masked" if direction == "deletion" else "restored"), ylabel="p / p(unmasked image)")  # fmt: skip
        axes.legend(fontsize="small")
    return figure


def pointing_game_figure(per_layer: dict[str, dict]) -> Figure:
    """Bar chart of the pointing game per category, one group of bars per layer.

    Args:
        per_layer: layer name -> metrics whose "pointing_game_by_category" maps a category to
            its hit rate, 0 to 1 (None where it has no finite value: left out).
    """
    figure = Figure(figsize=(8, 4), layout="tight")
    axes = figure.subplots()
    width = 0.8 / len(per_layer)
    for slot, (layer, metrics) in enumerate(per_layer.items()):
        by_category = {name: value for name, value in metrics["pointing_game_by_category"].items() if value is not None}
        positions = np.arange(len(by_category)) + slot * width
        axes.bar(positions, list(by_category.values()), width, label=layer)
        axes.set_xticks(positions, list(by_category))
    axes.set(ylim=(0, 1), ylabel="pointing game (hit rate)", title="Pointing game per category")
    axes.legend(fontsize="small")
    return figure


def log_prob_change_figure(words: list[str], changes: list[float]) -> Figure:
    """One bar per caption word: its change in log p when the region is masked (below zero:
    the region supported the word). Drawn with matplotlib, which the page already holds,
    rather than a Vega chart whose pandas and pyarrow cost the server over 100 MB."""
    figure = Figure(figsize=(8, 2.6), layout="constrained")
    axes = figure.subplots()
    colours = ["#b03030" if change < 0 else "#4a7ab0" for change in changes]
    axes.bar(range(len(words)), changes, color=colours)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(words)), words, rotation=30, ha="right")
    for label in axes.get_xticklabels():
        label.set_parse_math(False)  # words are model text, not LaTeX
    axes.set_ylabel("Δ log p")
    return figure
