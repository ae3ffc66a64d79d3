"""The demo's results: an aligned table for the console and ``REPORT.md`` (its figure: :mod:`lmerge.demo.figures`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lmerge.demo.runs import MethodResult, TaskAlone
from lmerge.evaluation.task_vectors import ALL, TaskVectorStats
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


def task_vector_lines(vectors: TaskVectorStats) -> list[str]:
    """REPORT.md's task-vector section: each task vector's size relative to the base weights
    (whole model and per layer) and the cosine similarity of every pair, whole model and per layer."""
    relative = vectors.relative_sizes(ALL) is not None
    size = "size vs base weights" if relative else "norm (base weights not found)"
    lines = ["## Task vectors: why tasks interfere", ""]
    lines += [
        "Computed from the adapters' LoRA factors (`<B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T))`, no "
        "dense delta). Size: the task vector's Frobenius norm over the adapted modules divided by the base "
        "weights' there; a large vector rewrites much of the model, and two vectors that point the same way "
        "(cosine near 1) or opposite ways (near -1) compete for the same weights.",
        "",
        f"| task | {size} | " + " | ".join(vectors.layers) + " |",
        "|---|---|" + "---|" * len(vectors.layers),
    ]
    for index, name in enumerate(vectors.names):
        values = [vectors.relative_sizes(layer) if relative else vectors.norms(layer) for layer in vectors.layers]
        overall = (vectors.relative_sizes(ALL) if relative else vectors.norms(ALL))[index]
        lines.append(f"| {name} | {overall:.3f} | " + " | ".join(f"{v[index]:.3f}" for v in values) + " |")
    lines += ["", "Cosine similarity of the task vectors, all layers:", ""]
    lines += ["| | " + " | ".join(vectors.names) + " |", "|---|" + "---|" * len(vectors.names)]
    for name, row in zip(vectors.names, vectors.cosine(ALL)):
        lines.append(f"| {name} | " + " | ".join(f"{v:+.3f}" for v in row) + " |")
    pairs = [(i, j) for i in range(len(vectors.names)) for j in range(i + 1, len(vectors.names))]
    if pairs:
        lines += ["", "Per layer:", ""]
        lines += ["| layer | " + " | ".join(f"{vectors.names[i]} / {vectors.names[j]}" for i, j in pairs) + " |"]
        lines.append("|---|" + "---|" * len(pairs))
        for layer in vectors.layers:
            cosine = vectors.cosine(layer)
            lines.append(f"| {layer} | " + " | ".join(f"{cosine[i][j]:+.3f}" for i, j in pairs) + " |")
    return [*lines, ""]


def adapter_lines(alone: dict[str, TaskAlone], vectors: TaskVectorStats | None) -> list[str]:
    """REPORT.md's adapters section: per task, the adapter alone, its head alone on the frozen
    base, what the adapter adds, and the task vector's size relative to the base weights."""
    sizes = dict(zip(vectors.names, vectors.relative_sizes(ALL) or [])) if vectors is not None else {}
    lines = ["## The adapters alone (test split)", ""]
    lines += ["| task | metric | adapter alone | head alone on the frozen base | the adapter adds | task vector size |"]
    lines.append("|---|---|---|---|---|---|")
    for task, a in alone.items():
        size = f"{sizes[task]:.3f}" if task in sizes else "n/a"
        added = f"{a.single - a.head_alone:+.4f}"
        lines.append(f"| {task} | {a.metric} | {a.single:.4f} | {a.head_alone:.4f} | {added} | {size} |")
    lines += [
        "",
        "Task vector size: the adapter's update `scaling * B A`, Frobenius norm over the adapted modules, "
        "divided by the base weights' there.",
        "",
    ]
    return lines


def prediction_lines(results: Sequence[MethodResult], alone: dict[str, TaskAlone]) -> list[str]:
    """REPORT.md's predicted-class section: per task, the share of test examples each method
    predicts as each class, beside the true shares (a merge that collapses a task onto one class
    shows here)."""
    lines = ["## Predicted classes on the test split", ""]
    for task, a in alone.items():
        total = sum(a.labels.values()) or 1
        lines += [f"**{task}**", "", "| | " + " | ".join(a.labels) + " |", "|---|" + "---|" * len(a.labels)]
        rows = {"true labels": a.labels, **a.predicted}
        rows.update({r.name: r.extra["predicted"][task] for r in results if task in r.extra.get("predicted", {})})
        for name, counts in rows.items():
            shares = (f"{counts.get(label, 0) / total:.0%}" for label in a.labels)
            lines.append(f"| {name} | " + " | ".join(shares) + " |")
        lines.append("")
    return lines


def write_report(
    path: Path,
    results: Sequence[MethodResult],
    metrics: dict[str, str],
    data: dict[str, dict],
    chart: Path,
    facts: dict[str, str],
    vectors: TaskVectorStats | None = None,
    alone: dict[str, TaskAlone] | None = None,
) -> None:
    """``REPORT.md``: the data, the adapters alone (with ``alone``), the results table, the chart,
    the predicted classes, the task vectors (with ``vectors``), and how and where it ran."""
    lines = ["# lmerge demo report", "", "## Data (deduplicated, then split with a fixed seed)", ""]
    lines += ["| task | examples | labels | train | validation | test |", "|---|---|---|---|---|---|"]
    for task, manifest in data.items():
        counts = manifest["counts"]
        lines.append(
            f"| {task} | {manifest['examples']} | {len(manifest['labels'])} | "
            f"{counts['train']} | {counts['validation']} | {counts['test']} |"
        )
    lines.append("")
    lines += adapter_lines(alone, vectors) if alone else []
    lines += ["## Results on the test split", "", markdown_table(results, metrics), "", verdict(results), ""]
    lines += [
        "`normalized`: mean over tasks of score / the task's own adapter's score; `min delta`: the worst "
        "task's score minus its own adapter's. The sweeps pick their point on the validation split; "
        "AdaMerging reads the unlabeled test inputs and SuperMerge fits each task's own adapter's "
        "predictions on the train split's inputs, both stopped on the validation split; gradient CE and "
        "regret smooth-max train on the validation split.",
        "",
        f"![per-task scores, task-vector similarities and sizes]({chart.name})",
        "",
    ]
    lines += prediction_lines(results, alone) if alone else []
    lines += task_vector_lines(vectors) if vectors is not None else []
    lines += ["## Run", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += ["", "## Outputs", ""]
    lines += [f"- {r.name}: `{r.detail}`" for r in results if r.detail and r.kind != "single"]
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode(), root=path.parent)
