"""What a sweep leaves behind: the summary JSON, the plot, the final table and the best point as
a ready-to-run ``lmerge merge`` config."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path
from typing import Any

import yaml

from lmerge.outputs import write_bytes_atomic, write_json_atomic
from lmerge.sweep.config import SweepConfig
from lmerge.sweep.ranking import rank_key


def write_summary(path: Path, summary: dict[str, Any], root: str | Path) -> None:
    """``sweep_<timestamp>.json`` (inside the output root ``root``): identity, search config,
    every point and the best one."""
    write_json_atomic(path, summary, root=root)


def table(points: list[dict[str, Any]], names: list[str]) -> str:
    """Points best first: rank, swept values, score, average delta and each task's delta."""
    tasks = list(points[0]["tasks"]) if points else []
    header = ["rank", *names, "score", "avg delta", *tasks]
    rows = [header]
    for rank, point in enumerate(sorted(points, key=rank_key, reverse=True), 1):
        values = [_fmt(point["params"].get(name)) for name in names]
        deltas = [f"{point['tasks'][t]['interference_delta']:+.4f}" for t in tasks]
        mark = " (warm)" if point.get("warm_start") else ""
        rows.append([f"{rank}{mark}", *values, f"{point['score']:+.4f}", f"{point['average_delta']:+.4f}", *deltas])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot(path: Path, points: list[dict[str, Any]], names: list[str], root: str | Path) -> None:
    """A PNG with one panel per swept parameter: the score and each task's delta against it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(points[0]["tasks"]) if points else []
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        values = [point["params"].get(name) for point in points]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values})
        x = values if numeric else [labels.index(str(v)) for v in values]
        for task in tasks:
            ax.scatter(
                x, [p["tasks"][task]["interference_delta"] for p in points], s=14, alpha=0.6, label=f"{task} delta"
            )
        ax.scatter(x, [p["score"] for p in points], s=36, marker="D", color="black", label="score (min delta)")
        ax.axhline(0.0, color="grey", linewidth=0.5)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(name)
        ax.set_ylabel("interference delta")
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue(), root=root)


def best_merge_config(config: SweepConfig, best: dict[str, Any], path: Path) -> str:
    """The best point as an ``lmerge merge`` config (YAML text, first line the command), written to ``path``."""
    data: dict[str, Any] = {
        "adapters": list(config.adapters),
        "method": config.method,
        "merge_mode": config.merge_mode,
        "method_params": best["params"],
        "transforms": config.transforms,
        "lambda_policy": config.lambda_policy,
        "save": {k: v for k, v in dataclasses.asdict(config.save).items() if v is not None},
        "output_dir": config.output_dir,
        "catalog": config.catalog,
        "eval_tasks": config.eval_tasks,
        "split": config.split,
        "eval_subset": config.eval_subset,
        "eval_batch_size": config.eval_batch_size,
        "eval_harness": dataclasses.asdict(config.eval_harness) if config.eval_harness else None,
    }
    data = {k: v for k, v in data.items() if v is not None}
    text = (
        f"# lmerge merge --config {path}\n"
        f"# The best point of a sweep: score {best['score']:+.4f} (min interference delta), "
        f"average delta {best['average_delta']:+.4f}.\n"
    )
    text += yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    write_bytes_atomic(path, text.encode(), root=config.output_dir)
    return text


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
