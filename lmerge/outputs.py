"""Output paths, run bundles and atomic writes: the one place that decides where files go.

A ground-floor module: merging, saving, evaluation and sweeps write through it, and it
imports none of them. Every file is written to a temporary name and renamed, and a run
bundle is built in a hidden staging directory that is renamed into place when complete,
so a crash never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from lmerge.errors import OutputError

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
# A staging folder names its owner (host and process), so a later run can tell one left by a
# killed process (removed) from one still being written (left alone).
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_STAGING = re.compile(r"^\.run\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]+\.staging$")


# The root of all outputs unless a config or flag names another.
DEFAULT_OUTPUT_DIR = "artifacts"


def safe_component(name: str, what: str = "name") -> str:
    """``name`` if it is usable as one path component inside the output root, else an error.

    Refuses separators, ``..``, absolute paths and hidden names, so task names and tags
    cannot escape the output root.
    """
    if not isinstance(name, str) or not _SAFE.match(name) or ".." in name:
        raise OutputError(f"{what} {name!r} is not a safe file name (letters, digits, . _ + = - only)")
    return name


def task_combo(names: list[str]) -> str:
    """Directory name for a set of adapters, e.g. ``sentiment_question``."""
    return "_".join(safe_component(n, "adapter name") for n in names)


def inside_root(root: str | Path, path: str | Path) -> Path:
    """``path`` if it stays inside ``root`` once symlinks are resolved, else an error: a symlink
    planted inside the output root cannot redirect writes outside it."""
    real_root, real = Path(root).resolve(), Path(path).resolve()
    if real != real_root and real_root not in real.parents:
        raise OutputError(f"{path}: resolves to {real}, outside the output root {real_root}; refusing to write there")
    return Path(path)


def merged_dir(root: str | Path, method: str, names: list[str]) -> Path:
    """``<root>/merged/<method>/<task_combo>``."""
    return inside_root(root, Path(root) / "merged" / safe_component(method, "method") / task_combo(names))


def check_output_root(root: str | Path, create: bool = True) -> Path:
    """The output root, created if missing (unless ``create`` is false: then only checked that it
    can be); a clear error if it is a file or not writable."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise OutputError(f"output_dir {root}: exists and is not a directory")
    if not create:
        nearest = next(p for p in (root.absolute(), *root.absolute().parents) if p.exists())
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise OutputError(f"output_dir {root}: not writable")
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"output_dir {root}: cannot be created ({exc.strerror})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise OutputError(f"output_dir {root}: not writable")
    return root


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from None
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


@dataclass
class Staged:
    """A directory being built: files go into ``work``; ``final`` is set once it is in place."""

    work: Path
    final: Path | None = None


@contextlib.contextmanager
def staged_dir(parent: Path, final_name: Callable[[], Path]) -> Iterator[Staged]:
    """Yield a hidden staging directory in ``parent``; on success rename it to
    ``final_name()`` (asked again if another process took that name meanwhile), on any
    failure remove it and the folders made for it. Staging folders that killed processes of
    this host left in ``parent`` are removed first."""
    for attempt in range(3):
        created = _make_dirs(parent)
        _remove_abandoned_staging(parent)
        try:
            prefix = f".run.{_HOST}.{os.getpid()}."
            staged = Staged(work=Path(tempfile.mkdtemp(prefix=prefix, suffix=".staging", dir=parent)))
            break
        except FileNotFoundError:
            # Another process's failed run removed the empty folders just made; make them again.
            if attempt == 2:
                raise OutputError(f"{parent}: keeps disappearing; cannot stage a run there") from None
    staging = staged.work
    try:
        yield staged
        for _ in range(1000):
            final = final_name()
            try:
                os.rename(staging, final)
                staged.final = final
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        raise OutputError(f"{parent}: could not find a free directory name")
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        # safetensors reports a failed write (disk full, file too large) as its own error type.
        if isinstance(exc, OSError | SafetensorError):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise OutputError(f"{parent}: cannot be written ({reason})") from None
        raise


def _remove_abandoned_staging(parent: Path) -> None:
    """Remove the staging folders in ``parent`` whose process (on this host) no longer runs."""
    for entry in parent.iterdir():
        owner = _STAGING.match(entry.name)
        if owner and owner["host"] == _HOST and not _process_alive(int(owner["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _make_dirs(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; the ones this call made, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for path in reversed(missing):
        try:
            path.mkdir()
            made.append(path)
        except FileExistsError:
            pass  # another process made it meanwhile: not ours to remove
        except OSError as exc:
            _remove_empty(made[::-1])
            raise OutputError(f"{path}: cannot be created ({exc.strerror})") from None
    return made[::-1]


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty, so a failed run leaves no trace."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (another run uses it) or gone


def new_run_dir(parent: Path, now: datetime | None = None) -> Path:
    """A not-yet-existing ``run_YYYYMMDD_HHMMSS`` path under ``parent``; a suffix keeps runs
    started in the same second apart."""
    stamp = (now or datetime.now()).strftime("run_%Y%m%d_%H%M%S")
    candidate = parent / stamp
    suffix = 1
    while candidate.exists():
        candidate = parent / f"{stamp}_{suffix}"
        suffix += 1
    return candidate


def run_bundle(root: str | Path, method: str, names: list[str]) -> contextlib.AbstractContextManager[Staged]:
    """Stage a run bundle ``<root>/merged/<method>/<combo>/runs/run_<time>/``: it appears,
    complete, when the block ends without error (its path is then ``.final``), and not at
    all otherwise."""
    runs = inside_root(root, merged_dir(check_output_root(root), method, names) / "runs")
    return staged_dir(runs, lambda: new_run_dir(runs))


def eval_dir(root: str | Path, method: str, names: list[str], split: str, namespace: str) -> Path:
    """``<root>/merged/<method>/<combo>/eval/<split>/`` for full splits, with a
    ``<namespace>/`` level below for eval subsets so they never overwrite full-split files."""
    base = merged_dir(root, method, names) / "eval" / safe_component(split, "split")
    folder = base if namespace == "full" else base / safe_component(namespace, "subset namespace")
    return inside_root(root, folder)


def index_path(root: str | Path, method: str, names: list[str]) -> Path:
    """The append-only evaluation history ``<root>/merged/<method>/<combo>/eval/index.json``."""
    return inside_root(root, merged_dir(root, method, names) / "eval") / "index.json"


def append_index(path: Path, entry: dict[str, Any]) -> int:
    """Append ``entry`` to the JSON list at ``path`` under an inter-process lock; returns the
    new length. The file is rewritten atomically, so readers never see a partial list."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:
            entries = json.loads(path.read_text()) if path.exists() else []
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            # Never overwrite a history we cannot read: the user decides what to keep of it.
            raise OutputError(f"{path}: not a readable eval index ({exc}); move it aside to start a new one") from None
        if not isinstance(entries, list):
            raise OutputError(f"{path}: expected a JSON list of evaluations")
        entries.append(entry)
        write_json_atomic(path, entries)
    return len(entries)


def task_metrics_link(root: str | Path, task: str, split: str, others: list[str], label: str) -> Path:
    """``<root>/<task>/metrics/eval/<split>/merged/<other_tasks>/<label>/metrics.json``."""
    other = "_".join(safe_component(o, "task") for o in others) or "alone"
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


def link_atomic(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` with a relative symlink, replacing any older link atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(target, link.parent)
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(relative, tmp)
    os.replace(tmp, link)
