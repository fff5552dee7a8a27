"""Matplotlib figures for the app, built with the object API (pyplot's global state is not
thread-safe, and every browser session runs in its own thread)."""

from __future__ import annotations

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
