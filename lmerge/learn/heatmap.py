"""Labelled heatmaps: the coefficient heatmap (layers x adapters) of ``coefficients.png`` and
TensorBoard's ``coefficients/heatmap``, and any other matrix with named rows and columns.

Drawn with matplotlib's object API (no pyplot: no global figure state, safe in any thread);
matplotlib is imported when a heatmap is drawn, not when this module is.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def draw_heatmap(
    axes: Axes,
    values: Sequence[Sequence[float]],
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    label: str = "",
    signed: bool | None = None,
    limits: tuple[float, float] | None = None,
    digits: int = 2,
) -> None:
    """Draw ``values`` [rows x columns] on ``axes``: named rows and columns, each value printed in
    its cell, and a colour bar labelled ``label``. The scale is diverging around 0 (blue below,
    red above) when ``signed`` (default: when any value is negative), else sequential; ``limits``
    fixes its range."""
    grid = np.asarray(values, dtype=np.float64).reshape(len(rows), len(columns))
    finite = grid[np.isfinite(grid)]
    if signed is None:
        signed = bool(finite.size and finite.min() < 0)
    if limits is None:
        reach = float(np.abs(finite).max()) if finite.size else 1.0
        reach = reach or 1.0
        limits = (-reach, reach) if signed else (min(0.0, float(finite.min(initial=0.0))), reach)
    colormap = "RdBu_r" if signed else "viridis"
    image = axes.imshow(grid, cmap=colormap, vmin=limits[0], vmax=limits[1], aspect="auto")
    axes.set_xticks(range(len(columns)), list(columns), rotation=30 if len(columns) > 3 else 0, ha="right")
    axes.set_yticks(range(len(rows)), list(rows))
    size = max(5.0, min(9.0, 60.0 / max(len(columns), 1)))
    span = (limits[1] - limits[0]) or 1.0
    for (row, column), value in np.ndenumerate(grid):
        # White text where the colour is dark: both ends of the diverging scale, the low end of viridis.
        place = (value - limits[0]) / span
        dark = abs(place - 0.5) > 0.3 if signed else place < 0.55
        color = "white" if dark else "black"
        axes.text(column, row, f"{value:.{digits}f}", ha="center", va="center", fontsize=size, color=color)
    bar = axes.figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    bar.set_label(label)


def heatmap_figure(
    values: Sequence[Sequence[float]],
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str = "",
    label: str = "coefficient",
    signed: bool | None = None,
) -> Figure:
    """A figure holding one labelled heatmap (see :func:`draw_heatmap`), sized for its cells."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2.4 + 1.1 * len(columns), 1.4 + 0.38 * len(rows)), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    draw_heatmap(axes, values, rows, columns, label=label, signed=signed)
    axes.set_xlabel("adapter")
    axes.set_title(title, fontsize=10)
    return figure


def figure_png(figure: Figure) -> bytes:
    """``figure`` encoded as PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def figure_image(figure: Figure) -> np.ndarray:
    """``figure`` rendered as an RGB uint8 array [height, width, 3] (for TensorBoard)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def coefficient_heatmap(
    values: Sequence[Sequence[float]], groups: Sequence[str], adapters: Sequence[str], signed: bool | None = None
) -> Figure:
    """The learned coefficients [groups x adapters] as a labelled heatmap: layers down, adapters across."""
    return heatmap_figure(values, groups, adapters, title="merge coefficients", signed=signed)
