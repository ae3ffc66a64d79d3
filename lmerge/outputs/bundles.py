"""Run bundles: a folder built under a hidden staging name that appears, complete, in one step,
together with its entry in the eval index.

Every rename into a bundles folder happens under that folder's lock. The commit of an evaluated
run, also under the index's lock: choose the bundle's final name, write a pending record into the
staging folder, append the index entry, rename the staging folder, write the evaluation's views
(:meth:`Staged.record`), and remove the pending record. A process killed anywhere in between
leaves a staging folder or a bundle with its pending record; the next run in the same folder rolls
a staging folder forward when its entry is in the index and removes it otherwise, and a retry of
the same run (same run id) takes over a killed attempt's bundle and entry instead of adding more.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from lmerge.errors import LMergeError, OutputError
from lmerge.outputs.files import (
    file_lock,
    make_dirs,
    remove_empty,
    remove_file,
    remove_tree,
    rename,
    write_json_atomic,
)
from lmerge.outputs.index import index_lock, read_index
from lmerge.outputs.paths import check_output_root, inside_root, merged_dir, new_run_dir

# A staging folder names its owner (host and process), so a later run can tell one left by a
# killed process (cleaned up) from one still being written (left alone).
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_STAGING = re.compile(r"^\.run\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]+\.staging$")
PENDING = ".lmerge_pending.json"
"""Inside a staging folder or bundle: its commit record, until the run has finished."""
_LOCK_FILE = ".lmerge.lock"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


@dataclass
class _Record:
    index: Path
    entry: Callable[[Path], dict[str, Any]]
    views: Callable[[Path], None]


@dataclass
class Staged:
    """A directory being built: files go into ``work``; ``final`` is set once it is in place."""

    work: Path
    root: Path
    run_id: str | None = None
    """Names the run across retries: a retry of a killed run takes over its index entry."""
    final: Path | None = None
    retried: bool = False
    """Whether ``final`` is the bundle of an earlier, killed attempt of this run (its entry kept)."""
    _record: _Record | None = field(default=None, repr=False)

    def record(
        self, index: Path, entry: Callable[[Path], dict[str, Any]], views: Callable[[Path], None] = lambda _: None
    ) -> None:
        """Commit the bundle with an index entry: ``entry(final)`` is appended to ``index`` in the
        same step that puts the bundle in place, and ``views(final)`` (files beside the bundle
        that present its results) written before the run counts as finished."""
        if self.run_id is None:
            raise OutputError(f"{self.work}: a run recorded in an index needs a run id")
        self._record = _Record(inside_root(self.root, index), entry, views)


@contextlib.contextmanager
def staged_dir(
    parent: Path, final_name: Callable[[set[str]], Path], *, root: str | Path, run_id: str | None = None
) -> Iterator[Staged]:
    """Yield a hidden staging directory in ``parent`` (inside ``root``); on success it becomes
    ``final_name(taken)``, a name that exists nowhere and is not in ``taken`` (names that killed
    runs' index entries hold), with its index entry when the block called
    :meth:`Staged.record`; on any failure it is removed with the folders made for it. What killed
    processes of this host left in ``parent`` is cleaned up first."""
    parent = inside_root(root, parent)
    for attempt in range(3):
        created = make_dirs(parent, root=root)
        try:
            with _folder_lock(parent, root):
                _recover_abandoned(parent, root)
            prefix = f".run.{_HOST}.{os.getpid()}."
            work = Path(tempfile.mkdtemp(prefix=prefix, suffix=".staging", dir=parent))
            break
        except FileNotFoundError:
            # Another process's failed run removed the empty folders just made; make them again.
            if attempt == 2:
                raise OutputError(f"{parent}: keeps disappearing; cannot stage a run there") from None
        except OSError as exc:
            remove_empty(created)
            raise OutputError(f"{parent}: cannot be written ({exc.strerror or exc})") from None
    staged = Staged(work=work, root=Path(root), run_id=run_id)
    try:
        yield staged
        with _folder_lock(parent, root):
            _recover_abandoned(parent, root)
            _commit(staged, final_name, _pending_names(parent))
    except BaseException as exc:
        remove_tree(staged.work, root=root)
        if staged.final is None:
            remove_empty(created)
        else:
            _abandon(staged.final, root)
        # safetensors reports a failed write (disk full, file too large) as its own error type.
        if isinstance(exc, OSError | SafetensorError) and not isinstance(exc, LMergeError):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise OutputError(f"{parent}: cannot be written ({reason})") from None
        raise


def run_bundle(
    root: str | Path, method: str, names: list[str], run_id: str | None = None
) -> contextlib.AbstractContextManager[Staged]:
    """Stage a run bundle ``<root>/merged/<method>/<combo>/runs/run_<time>/``: it appears,
    complete, when the block ends without error (its path is then ``.final``), and not at
    all otherwise."""
    runs = merged_dir(check_output_root(root), method, names) / "runs"
    return staged_dir(runs, lambda taken: new_run_dir(runs, taken=taken), root=root, run_id=run_id)


# ---- committing: every rename into a folder happens under its lock --------------------------------
@contextlib.contextmanager
def _folder_lock(folder: Path, root: str | Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (``flock`` on its descriptor), so no lock file is
    left behind and a folder a failed run emptied can be removed; where the file system cannot
    lock a folder (NFS), a lock file in it."""
    fd = os.open(inside_root(root, folder), os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            with file_lock(folder / _LOCK_FILE, root=root):
                yield
            return
        yield
    finally:
        os.close(fd)  # releases the lock


def _commit(staged: Staged, final_name: Callable[[set[str]], Path], taken: set[str]) -> None:
    root, record = staged.root, staged._record
    if record is None:
        final = inside_root(root, final_name(taken))
        rename(staged.work, final, root=root)
        staged.final = final
        return
    with index_lock(record.index, root=root):
        entries = read_index(record.index)
        earlier = _killed_attempt(entries, staged.run_id, staged.work.parent)
        if earlier is not None:
            # A retry: the killed attempt's bundle and entry stand for this run; ours goes.
            remove_tree(staged.work, root=root)
            staged.final, staged.retried = earlier, True
        else:
            final = inside_root(root, final_name(taken))
            pending = {"run_id": staged.run_id, "final": final.name, "index": str(record.index)}
            write_json_atomic(staged.work / PENDING, {**pending, "host": _HOST, "pid": os.getpid()}, root=root)
            write_json_atomic(record.index, [*entries, record.entry(final)], root=root)
            try:
                rename(staged.work, final, root=root)
            except BaseException:
                write_json_atomic(record.index, entries, root=root)  # the entry goes with the bundle
                raise
            staged.final = final
        record.views(staged.final)
        remove_file(staged.final / PENDING, root=root)


def _killed_attempt(entries: list[dict[str, Any]], run_id: str | None, parent: Path) -> Path | None:
    """The bundle in ``parent`` of an earlier attempt of run ``run_id`` that was committed but
    did not finish: killed (its pending record names a process of this host that is gone) or
    failed (the record says it was abandoned)."""
    for entry in entries:
        if entry.get("run_id") != run_id or not isinstance(entry.get("run_dir"), str):
            continue
        name = Path(entry["run_dir"]).name
        if not _SAFE_NAME.match(name) or ".." in name:
            continue  # not a bundle name lmerge writes
        bundle = parent / name
        owner = _pending(bundle)
        if owner and (owner.get("pid") is None or owner.get("host") == _HOST and not _process_alive(owner.get("pid"))):
            return bundle
    return None


def _abandon(bundle: Path, root: str | Path) -> None:
    """Mark a committed bundle whose run failed before it finished (its views) as abandoned: a
    retry of the same run takes it over, as it would a killed one's."""
    pending = _pending(bundle)
    if pending is not None:
        with contextlib.suppress(LMergeError):  # the failure being reported matters more
            write_json_atomic(bundle / PENDING, {**pending, "pid": None}, root=root)


# ---- cleaning up after killed processes ---------------------------------------------------------
def _recover_abandoned(parent: Path, root: str | Path) -> None:
    """Staging folders in ``parent`` whose process (on this host) no longer runs: rolled forward
    into place when their index entry was written, removed otherwise. Called under the folder's lock."""
    for entry in parent.iterdir():
        owner = _STAGING.match(entry.name)
        if not owner or owner["host"] != _HOST or _process_alive(int(owner["pid"])):
            continue
        pending = _pending(entry)
        if (
            pending is None
            or not isinstance(pending.get("index"), str)
            or not _SAFE_NAME.match(str(pending.get("final")))
        ):
            remove_tree(entry, root=root)
            continue
        final = parent / pending["final"]
        index = inside_root(root, pending["index"])
        with index_lock(index, root=root):
            entries = read_index(index)
        committed = any(
            e.get("run_id") == pending.get("run_id") and Path(str(e.get("run_dir"))).name == final.name for e in entries
        )
        if committed and not final.exists():
            rename(entry, final, root=root)
        else:
            remove_tree(entry, root=root)


def _pending_names(parent: Path) -> set[str]:
    """The final names that staging folders in ``parent`` hold for their index entries."""
    names = set()
    for entry in parent.iterdir():
        if _STAGING.match(entry.name):
            pending = _pending(entry)
            if pending and isinstance(pending.get("final"), str):
                names.add(pending["final"])
    return names


def _pending(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / PENDING).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True
