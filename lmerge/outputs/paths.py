"""Output paths: the layout of the output root, and the one check that a path stays inside it."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection
from datetime import datetime
from pathlib import Path

from lmerge.errors import OutputError

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")

# The root of all outputs unless a config or flag names another.
DEFAULT_OUTPUT_DIR = "artifacts"

MAX_NAME_BYTES = 200
"""Longest file or folder name lmerge writes: file systems allow 255 bytes, and a temporary
name adds a prefix and a suffix to the final one."""


def safe_component(name: str, what: str = "name") -> str:
    """``name`` if it is usable as one path component inside the output root, else an error.

    Refuses separators, ``..``, absolute paths, hidden names and names too long for a file
    system, so task names and tags cannot escape the output root or fail half-way through a run.
    """
    if not isinstance(name, str) or not _SAFE.match(name) or ".." in name:
        raise OutputError(f"{what} {name!r} is not a safe file name (letters, digits, . _ + = - only)")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise OutputError(f"{what} {name[:40]!r}...: {len(name)} characters, more than {MAX_NAME_BYTES} for a name")
    return name


def task_combo(names: list[str]) -> str:
    """Directory name for a set of adapters, e.g. ``sentiment_question`` (see :func:`joined_names`)."""
    return joined_names(names, "adapter name")


def joined_names(names: list[str], what: str) -> str:
    """``names`` joined by ``_`` as one folder name. A set too long for that (32 adapters of
    ordinary names pass the file system's limit) is named by its first names, how many more, and
    a digest of the whole joined list, so that distinct sets keep distinct folders:
    ``task0_task1_task2_and_29_more_3f1c9a0b2d4e``."""
    parts = [safe_component(name, what) for name in names]
    joined = "_".join(parts)
    if len(joined.encode()) <= MAX_NAME_BYTES:
        return joined
    digest = hashlib.sha256(joined.encode()).hexdigest()[:12]
    head: list[str] = []
    # Half the limit for the first names leaves room for the count and digest.
    while len(head) < len(parts) and len("_".join([*head, parts[len(head)]]).encode()) <= MAX_NAME_BYTES // 2:
        head.append(parts[len(head)])
    return "_".join([*head, f"and_{len(parts) - len(head)}_more_{digest}"])


def inside_root(root: str | Path, path: str | Path) -> Path:
    """``path`` if it stays inside ``root`` once symlinks are resolved, else an error: the one
    check of every path lmerge writes, renames or deletes, so a symlink planted inside the output
    root, or a name read from a file, cannot redirect a write outside it. Names too long for a
    file system are refused here too, before anything is written."""
    path = Path(path)
    for part in path.parts:
        if len(part.encode()) > MAX_NAME_BYTES:
            raise OutputError(f"{path}: the name {part[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    real_root, real = Path(root).resolve(), path.resolve()
    if real != real_root and real_root not in real.parents:
        raise OutputError(f"{path}: resolves to {real}, outside the output root {real_root}; refusing to write there")
    return path


def check_output_root(root: str | Path) -> Path:
    """The output root if it is, or can be made, a writable directory; a clear error otherwise.
    Nothing is created: folders appear with the first file written into them."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise OutputError(f"output_dir {root}: exists and is not a directory")
    nearest = next(p for p in (root.absolute(), *root.absolute().parents) if p.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise OutputError(f"output_dir {root}: not writable")
    return root


def check_folder(root: str | Path, folder: str | Path) -> Path:
    """``folder`` (inside ``root``) if it is, or can be made, a folder: the nearest of it and its
    parents that exists must be one. Checked before a run works, so a file where lmerge keeps a
    folder is refused before anything is computed, not when the results are written."""
    folder = inside_root(root, folder)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise OutputError(f"{path}: exists and is not a folder; lmerge writes a folder there")
            break
    return folder


def check_inputs_outside(root: str | Path, inputs: list[Path], what: str = "adapter") -> None:
    """Refuse an output root that is, or lies inside, one of the input directories ``inputs``:
    an input directory is never written."""
    real_root = Path(root).resolve()
    for folder in inputs:
        real = Path(folder).resolve()
        if real == real_root or real in real_root.parents:
            raise OutputError(f"output_dir {root}: lies inside the {what} {folder}; an input is never written")


def merged_dir(root: str | Path, method: str, names: list[str]) -> Path:
    """``<root>/merged/<method>/<task_combo>``."""
    return inside_root(root, Path(root) / "merged" / safe_component(method, "method") / task_combo(names))


def new_run_dir(parent: Path, now: datetime | None = None, taken: Collection[str] = ()) -> Path:
    """A not-yet-existing ``run_YYYYMMDD_HHMMSS`` path under ``parent``, whose name is not in
    ``taken``; a suffix keeps runs started in the same second apart."""
    stamp = (now or datetime.now()).strftime("run_%Y%m%d_%H%M%S")
    candidate = parent / stamp
    suffix = 1
    while candidate.exists() or candidate.is_symlink() or candidate.name in taken:
        candidate = parent / f"{stamp}_{suffix}"
        suffix += 1
    return candidate


def eval_dir(root: str | Path, method: str, names: list[str], split: str, namespace: str) -> Path:
    """``<root>/merged/<method>/<combo>/eval/<split>/`` for full splits, with a
    ``<namespace>/`` level below for eval subsets so they never overwrite full-split files."""
    base = merged_dir(root, method, names) / "eval" / safe_component(split, "split")
    folder = base if namespace == "full" else base / safe_component(namespace, "subset namespace")
    return inside_root(root, folder)


def index_path(root: str | Path, method: str, names: list[str]) -> Path:
    """The append-only evaluation history ``<root>/merged/<method>/<combo>/eval/index.json``."""
    return inside_root(root, merged_dir(root, method, names) / "eval") / "index.json"


def task_metrics_link(root: str | Path, task: str, split: str, others: list[str], label: str) -> Path:
    """``<root>/<task>/metrics/eval/<split>/merged/<other_tasks>/<label>/metrics.json``."""
    other = joined_names(others, "task") or "alone"
    folder = task_eval_dir(root, task, split) / "merged" / other / safe_component(label, "tag")
    return inside_root(root, folder) / "metrics.json"


def task_eval_dir(root: str | Path, task: str, split: str) -> Path:
    """``<root>/<task>/metrics/eval/<split>``: everything recorded about one task on one split."""
    folder = Path(root) / safe_component(task, "task") / "metrics" / "eval" / safe_component(split, "split")
    return inside_root(root, folder)


def single_metrics_path(root: str | Path, task: str, split: str, namespace: str) -> Path:
    """``<root>/<task>/metrics/eval/<split>/single/<namespace>/metrics.json``: the cached
    score of the task's own adapter alone."""
    folder = task_eval_dir(root, task, split) / "single" / safe_component(namespace, "subset namespace")
    return inside_root(root, folder) / "metrics.json"


def subsets_dir(root: str | Path) -> Path:
    """``<root>/subsets``: cached eval-subset indices."""
    return inside_root(root, Path(root) / "subsets")
