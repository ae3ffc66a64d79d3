"""The coefficient heatmap: groups (layers) x adapters, as an image."""

from __future__ import annotations

import io

import numpy as np

CELL = 24  # pixels per heatmap cell


def heatmap(values: list[list[float]]) -> np.ndarray:
    """A [groups x adapters] heatmap as an RGB uint8 image: red positive, blue negative,
    white zero, on a scale set by the largest magnitude (or 1)."""
    grid = np.asarray(values, dtype=np.float64)
    scale = max(float(np.abs(grid).max()), 1.0) if grid.size else 1.0
    level = np.clip(grid / scale, -1.0, 1.0)[..., None]
    white, red, blue = np.array([1.0, 1.0, 1.0]), np.array([0.8, 0.1, 0.1]), np.array([0.1, 0.2, 0.8])
    colors = np.where(level >= 0, white + (red - white) * level, white + (blue - white) * -level)
    image = np.kron(colors, np.ones((CELL, CELL, 1)))
    return (image * 255).round().astype(np.uint8)


def heatmap_png(values: list[list[float]]) -> bytes:
    """The heatmap encoded as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(heatmap(values)).save(buffer, format="PNG")
    return buffer.getvalue()
