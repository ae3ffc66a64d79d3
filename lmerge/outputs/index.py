"""The append-only evaluation index ``eval/index.json``: read strictly, appended under an
inter-process lock, rewritten atomically so readers never see a partial list."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmerge.errors import OutputError
from lmerge.outputs.files import file_lock, write_json_atomic
from lmerge.outputs.paths import check_folder, inside_root


def read_index(path: Path) -> list[dict[str, Any]]:
    """The entries of the index at ``path`` (none when it does not exist yet). A file that is not
    a list of entries is refused, never overwritten: the user decides what to keep of it."""
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise OutputError(f"{path}: not a readable eval index ({reason}); move it aside to start a new one") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise OutputError(f"{path}: expected a JSON list of evaluations; move it aside to start a new one")
    return entries


def check_index(path: Path, *, root: str | Path) -> None:
    """Refuse, before a run does any work, an index it could not be appended to: one that cannot
    be read, in a folder that is a file, or whose lock file leads outside the output root or is
    not a plain file (a folder or a link, which the lock does not follow)."""
    inside_root(root, path)
    check_folder(root, path.parent)
    lock = inside_root(root, _lock_path(path))
    if lock.is_symlink() or (lock.exists() and not lock.is_file()):
        kind = "a link" if lock.is_symlink() else "not a file"
        raise OutputError(f"{lock}: is {kind}; an index's lock must be a plain file, remove it to go on")
    read_index(path)


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def locked_index(path: Path, *, root: str | Path) -> Iterator[list[dict[str, Any]]]:
    """Hold the index's lock (``index.json.lock`` beside it) and yield its entries; entries the
    block appends to the list are written, atomically, when it ends without error."""
    with index_lock(path, root=root):
        entries = read_index(path)
        known = len(entries)
        yield entries
        if len(entries) != known:
            write_json_atomic(path, entries, root=root)


@contextlib.contextmanager
def index_lock(path: Path, *, root: str | Path) -> Iterator[None]:
    """Hold the inter-process lock of the index at ``path`` (``index.json.lock`` beside it)."""
    lock_path = _lock_path(path)
    lock = file_lock(lock_path, root=root)
    try:
        lock.acquire()
    except OSError as exc:
        raise OutputError(f"{lock_path}: cannot be locked ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        lock.release()


def append_index(path: Path, entry: dict[str, Any], *, root: str | Path) -> int:
    """Append ``entry`` to the index at ``path`` under its lock; returns the new length."""
    with locked_index(path, root=root) as entries:
        entries.append(entry)
    return len(entries)
