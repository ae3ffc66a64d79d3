"""The demo's ``results.png``: every method's per-task scores, and why the tasks interfere: the
task vectors' cosine similarities (over the whole model and per layer) and their size per layer
relative to the base weights."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import TYPE_CHECKING

from lmerge.demo.runs import MethodResult
from lmerge.evaluation.task_vectors import ALL, TaskVectorStats
from lmerge.learn.heatmap import draw_heatmap, figure_png

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def results_png(
    results: Sequence[MethodResult], metrics: dict[str, str], vectors: TaskVectorStats | None = None
) -> bytes:
    """The scores as grouped bars; with ``vectors``, below them the cosine-similarity heatmaps
    (all layers, and per layer for each pair of tasks) and the per-layer size chart."""
    from matplotlib.figure import Figure

    width = max(10.0, 1.1 * len(results))
    if vectors is None:
        figure = Figure(figsize=(width, 4.8), dpi=110, layout="constrained")
        draw_scores(figure.add_subplot(), results, metrics)
        return figure_png(figure)
    rows = len(vectors.layers)
    figure = Figure(figsize=(width, 4.8 + 4.0 + max(3.0, 0.45 * rows) + 3.6), dpi=110, layout="constrained")
    axes = figure.subplot_mosaic(
        [["scores", "scores"], ["cosine", "layers"], ["sizes", "sizes"]],
        height_ratios=[4.8, max(4.0, 0.45 * rows), 3.6],
    )
    draw_scores(axes["scores"], results, metrics)
    draw_cosine(axes["cosine"], axes["layers"], vectors)
    draw_sizes(axes["sizes"], vectors)
    return figure_png(figure)


def draw_scores(axes: Axes, results: Sequence[MethodResult], metrics: dict[str, str]) -> None:
    """Per-task score of every method as grouped bars (one group per method, one bar per task)."""
    tasks = list(metrics)
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        xs = [m + (i - (len(tasks) - 1) / 2) * width for m in range(len(results))]
        axes.bar(xs, [r.scores[task] for r in results], width, label=f"{task} ({metrics[task]})")
    axes.set_xticks(range(len(results)), [r.name for r in results], rotation=30, ha="right", fontsize=8)
    axes.set_ylim(0.0, 1.12)  # room for the legend above the bars
    axes.set_ylabel("test score")
    axes.set_title("lmerge demo: per-task score of every method")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", ncol=len(tasks), frameon=False)


def draw_cosine(overall: Axes, per_layer: Axes, vectors: TaskVectorStats) -> None:
    """The task vectors' cosine similarity over the whole model (task x task) and per layer
    (layer x pair of tasks), on one diverging scale from -1 to 1."""
    names = vectors.names
    draw_heatmap(overall, vectors.cosine(ALL), names, names, label="cosine similarity", limits=(-1.0, 1.0), signed=True)
    overall.set_title("task-vector cosine similarity, all layers", fontsize=10)
    pairs = list(combinations(range(len(names)), 2))
    if not pairs:
        per_layer.set_axis_off()
        return
    grid = [[vectors.cosine(layer)[i][j] for i, j in pairs] for layer in vectors.layers]
    columns = [f"{names[i]} / {names[j]}" for i, j in pairs]
    draw_heatmap(per_layer, grid, vectors.layers, columns, label="cosine similarity", limits=(-1.0, 1.0), signed=True)
    per_layer.set_title("per layer, each pair of tasks", fontsize=10)


def draw_sizes(axes: Axes, vectors: TaskVectorStats) -> None:
    """Each task vector's norm per layer relative to the base weights' (the plain norm where the
    base weights are unknown), one line per task; the legend gives the whole model's value."""
    relative = vectors.relative_sizes(ALL) is not None
    xs = range(len(vectors.layers))
    for index, name in enumerate(vectors.names):
        per_layer = [
            (vectors.relative_sizes(layer) if relative else vectors.norms(layer))[index] for layer in vectors.layers
        ]
        overall = (vectors.relative_sizes(ALL) if relative else vectors.norms(ALL))[index]
        axes.plot(xs, per_layer, marker="o", label=f"{name} (all layers: {overall:.3f})")
    axes.set_xticks(xs, vectors.layers, fontsize=8)
    axes.set_ylabel("||task vector|| / ||base weights||" if relative else "||task vector||")
    axes.set_ylim(bottom=0.0)
    axes.set_title("task-vector size per layer" + (", relative to the base weights" if relative else ""), fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, frameon=False)
