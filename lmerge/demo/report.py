"""The demo's results: an aligned table for the console, ``REPORT.md``, and a bar chart PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from lmerge.demo.runs import MethodResult
from lmerge.outputs import write_bytes_atomic


def result_rows(results: Sequence[MethodResult], metrics: dict[str, str]) -> list[list[str]]:
    """Header and one row per method: each task's metric, average, normalized, min delta, seconds."""
    header = ["method", *(f"{task} ({metric})" for task, metric in metrics.items())]
    header += ["average", "normalized", "min delta", "seconds"]
    rows = [header]
    for r in results:
        cells = [r.name, *(f"{r.scores[task]:.4f}" for task in metrics)]
        cells += [f"{r.average:.4f}", f"{r.normalized:.4f}", f"{r.min_delta:+.4f}", f"{r.seconds:.0f}"]
        rows.append(cells)
    return rows


def text_table(results: Sequence[MethodResult], metrics: dict[str, str]) -> str:
    """The results as aligned text (method left, numbers right)."""
    rows = result_rows(results, metrics)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(results: Sequence[MethodResult], metrics: dict[str, str]) -> str:
    """The results as a Markdown table."""
    rows = result_rows(results, metrics)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def verdict(results: Sequence[MethodResult], goal: float = 0.97) -> str:
    """One line: the best learned and the best static method by normalized average, against the goal."""
    learned = max((r for r in results if r.kind == "learned"), key=lambda r: r.normalized, default=None)
    static = max((r for r in results if r.kind in ("static", "sweep")), key=lambda r: r.normalized, default=None)
    if learned is None or static is None:
        return ""
    beats = "beats" if learned.normalized > static.normalized else "does not beat"
    reached = "reaches" if learned.normalized >= goal else "is below"
    return (
        f"best learned: {learned.name} {learned.normalized:.1%} of the single-task scores ({reached} the "
        f"{goal:.0%} goal), {beats} the best static method, {static.name} {static.normalized:.1%}"
    )


def bar_chart_png(results: Sequence[MethodResult], metrics: dict[str, str]) -> bytes:
    """Per-task score of every method as grouped bars (one group per method, one bar per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(metrics)
    width = 0.8 / len(tasks)
    figure, axes = plt.subplots(figsize=(max(8.0, 1.1 * len(results)), 4.8))
    for i, task in enumerate(tasks):
        xs = [m + (i - (len(tasks) - 1) / 2) * width for m in range(len(results))]
        axes.bar(xs, [r.scores[task] for r in results], width, label=f"{task} ({metrics[task]})")
    axes.set_xticks(range(len(results)), [r.name for r in results], rotation=30, ha="right", fontsize=8)
    axes.set_ylim(0.0, 1.12)  # room for the legend above the bars
    axes.set_ylabel("test score")
    axes.set_title("lmerge demo: per-task score of every method")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", ncol=len(tasks), frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_report(
    path: Path,
    results: Sequence[MethodResult],
    metrics: dict[str, str],
    data: dict[str, dict],
    chart: Path,
    facts: dict[str, str],
) -> None:
    """``REPORT.md``: the data, the results table, the chart, and how and where it ran."""
    lines = ["# lmerge demo report", "", "## Data (deduplicated, then split with a fixed seed)", ""]
    lines += ["| task | examples | labels | train | validation | test |", "|---|---|---|---|---|---|"]
    for task, manifest in data.items():
        counts = manifest["counts"]
        lines.append(
            f"| {task} | {manifest['examples']} | {len(manifest['labels'])} | "
            f"{counts['train']} | {counts['validation']} | {counts['test']} |"
        )
    lines += ["", "## Results on the test split", "", markdown_table(results, metrics), "", verdict(results), ""]
    lines += [
        "`normalized`: mean over tasks of score / the task's own adapter's score; `min delta`: the worst "
        "task's score minus its own adapter's. The sweeps pick their point on the validation split; "
        "AdaMerging reads the unlabeled test inputs; the other learners train on the validation split.",
        "",
        f"![per-task scores]({chart.name})",
        "",
        "## Run",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += ["", "## Outputs", ""]
    lines += [f"- {r.name}: `{r.detail}`" for r in results if r.detail and r.kind != "single"]
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode(), root=path.parent)
