"""Writing inside the output root: atomic files and links, folders made and removed, lock files.
Each function takes the root and checks its target with :func:`inside_root` first; a failing
write (disk full, out of inodes, read-only) is one :class:`OutputError` naming the path."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmerge.errors import OutputError
from lmerge.outputs.paths import inside_root

# Errors of the machine rather than of lmerge: the command reports them in one line.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM}


def os_error_line(exc: BaseException) -> str | None:
    """``<file>: <reason>`` for an OSError that the machine caused (disk full, out of inodes,
    quota, read-only, permissions, a name too long), wherever it was raised; None for others."""
    if not isinstance(exc, OSError) or exc.errno not in _ENVIRONMENT_ERRNOS:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}cannot be written ({exc.strerror or os.strerror(exc.errno)})"


@contextlib.contextmanager
def _reported(path: Path) -> Iterator[None]:
    """Turn an OSError of writing ``path`` into one OutputError line naming it."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from None


def make_dirs(folder: Path, *, root: str | Path) -> list[Path]:
    """Make ``folder`` and its missing parents inside ``root``; returns the ones this call made,
    deepest first (for :func:`remove_empty` when what they were made for fails)."""
    folder = inside_root(root, folder)
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made: list[Path] = []
    for path in reversed(missing):
        try:
            path.mkdir()
            made.append(path)
        except FileExistsError:
            pass  # another process made it meanwhile: not ours to remove
        except OSError as exc:
            remove_empty(made[::-1])
            raise OutputError(f"{path}: cannot be created ({exc.strerror})") from None
    return made[::-1]


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty, so a failed run leaves no trace."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (another run uses it) or gone


def write_bytes_atomic(path: str | Path, data: bytes, *, root: str | Path) -> None:
    """Write ``data`` to ``path`` (inside ``root``) through a temporary file in the same
    directory and a rename: readers see the old file or the new one, never a part."""
    path = inside_root(root, path)
    made = make_dirs(path.parent, root=root)
    with _reported(path):
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except BaseException:
            remove_empty(made)
            raise
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            remove_empty(made)
            raise


def write_json_atomic(path: str | Path, obj: Any, *, root: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically, inside ``root``."""
    data = (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()
    write_bytes_atomic(path, data, root=root)


def link_atomic(link: Path, target: Path, *, root: str | Path) -> None:
    """Point ``link`` (inside ``root``) at ``target`` with a relative symlink, replacing any
    older link atomically. The link itself is replaced, never followed: its folder is what must
    stay inside the root (an older link may lead anywhere, e.g. to an installed model)."""
    link = inside_root(root, Path(link).parent) / Path(link).name
    make_dirs(link.parent, root=root)
    relative = os.path.relpath(target, link.parent)
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    with _reported(link):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(relative, tmp)
        os.replace(tmp, link)


def rename(source: Path, target: Path, *, root: str | Path) -> None:
    """Rename ``source`` to ``target``, both inside ``root``; an OSError is the caller's to
    read (a taken name), as it is for :func:`os.rename`."""
    os.rename(inside_root(root, source), inside_root(root, target))


def remove_file(path: Path, *, root: str | Path) -> None:
    """Delete the file ``path`` (inside ``root``) if it is there."""
    with contextlib.suppress(FileNotFoundError):
        inside_root(root, path).unlink()


def remove_tree(path: Path, *, root: str | Path) -> None:
    """Delete the folder ``path`` (inside ``root``, and not the root itself) with what it holds."""
    if Path(path).resolve() == Path(root).resolve():
        raise OutputError(f"{path}: is the output root; refusing to delete it")
    shutil.rmtree(inside_root(root, path), ignore_errors=True)


def open_lock_file(path: Path, *, root: str | Path) -> int:
    """An open descriptor of the lock file ``path`` inside ``root``, created if missing
    (never through a symlink that leads outside)."""
    path = inside_root(root, path)
    make_dirs(path.parent, root=root)
    with _reported(path):
        return os.open(path, os.O_CREAT | os.O_RDWR, 0o644)


def file_lock(path: Path, *, root: str | Path):  # noqa: ANN201 - filelock's type, imported lazily
    """An inter-process lock on the file ``path`` inside ``root`` (``filelock.FileLock``)."""
    from filelock import FileLock

    path = inside_root(root, path)
    make_dirs(path.parent, root=root)
    return FileLock(str(path))


@contextlib.contextmanager
def removed_if_left_empty(root: str | Path) -> Iterator[None]:
    """Run a block that may create the output root ``root``: when the block fails and the root
    did not exist before it, the folders it made are removed again if no file was written in
    them, so a refused first run leaves no empty output root behind."""
    root = Path(root)
    existed = root.exists() or root.is_symlink()
    try:
        yield
    except BaseException:
        if not existed and root.is_dir() and not root.is_symlink():
            _remove_empty_tree(root)
        raise


def _remove_empty_tree(root: Path) -> None:
    """Remove ``root`` if it holds nothing but empty folders (walked bottom-up, links never followed)."""
    for folder, subfolders, files in os.walk(root, topdown=False):
        if files or any(Path(folder, name).is_symlink() for name in subfolders):
            return
        try:
            os.rmdir(folder)
        except OSError:
            return
