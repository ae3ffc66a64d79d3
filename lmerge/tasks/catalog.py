"""The task catalog: a YAML file mapping task names to their adapter and their data.

```yaml
tasks:
  sentiment:
    adapter: adapters/sentiment   # relative to this file
    kind: label_tokens
    dataset: {path: json, data_files: {train: data/train.json, test: data/test.json}}
    label_names: [negative, positive]
    prompt: "Review: {text}\\nSentiment:"
  question: adapters/question     # shorthand: the adapter path alone
```

Paths are relative to the catalog file: ``adapter``, every ``dataset.data_files`` entry and a
``dataset.path`` that names a local file or directory there. ``lmerge.data.load_task_catalog``
turns the entries into ``TaskSpec`` objects. A catalog whose files a command builds (the demo's)
names it in a top-level ``built_by: lmerge demo``; a missing adapter or data file then says to
run that command first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmerge.errors import ConfigError
from lmerge.yaml_files import read_yaml


def load_catalog(
    path: str | Path, *, require_adapter: bool = True, require_data: bool = True
) -> dict[str, dict[str, Any]]:
    """Task name -> entry (a mapping with ``adapter`` made absolute, and data paths made absolute).

    With ``require_adapter=False`` an entry may leave out ``adapter`` (a task with data only,
    e.g. one whose adapter is still to be trained); its ``adapter`` is then None, and a built
    catalog's adapters need not exist yet. ``require_data=False`` lets its data files be missing
    too (for the command that builds them).
    """
    path = Path(path)
    data = read_yaml(path, what="catalog")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict):
        raise ConfigError(f"catalog {path}: expected a mapping under 'tasks'")
    built_by = data.get("built_by")
    if built_by is not None and not isinstance(built_by, str):
        raise ConfigError(f"catalog {path}: built_by must be the command that builds its files")
    base = path.parent.resolve()
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in tasks.items():
        if isinstance(entry, str):
            entry = {"adapter": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"catalog {path}: tasks.{name} must be an adapter path or a mapping")
        adapter = entry.get("adapter")
        if not isinstance(adapter, str) and (require_adapter or adapter is not None):
            raise ConfigError(f"catalog {path}: tasks.{name}.adapter must be a path")
        entry = {**entry, "adapter": str((base / adapter).resolve()) if adapter else None}
        if "dataset" in entry:
            entry["dataset"] = _resolve_dataset(entry["dataset"], base, f"catalog {path}: tasks.{name}.dataset")
        entries[str(name)] = entry
    if built_by:
        _check_built(path, entries, built_by, require_adapter, require_data)
    return entries


def _check_built(path: Path, entries: dict, built_by: str, adapters: bool, data: bool) -> None:
    """One line naming the first missing file of a built catalog, and the command that builds it."""
    for name, entry in entries.items():
        wanted = [entry["adapter"]] if adapters and entry["adapter"] else []
        files = entry.get("dataset", {}).get("data_files") if data else None
        for split_files in files.values() if isinstance(files, dict) else [files or []]:
            wanted += [split_files] if isinstance(split_files, str) else split_files
        missing = [file for file in wanted if not Path(file).exists()]
        if missing:
            raise ConfigError(f"catalog {path}: tasks.{name}: {missing[0]} does not exist; run `{built_by}` first")


def _resolve_dataset(dataset: Any, base: Path, where: str) -> dict[str, Any]:
    """The ``load_dataset`` keyword arguments with local paths made absolute against ``base``."""
    if not isinstance(dataset, dict) or not isinstance(dataset.get("path"), str):
        raise ConfigError(f"{where} must be a mapping of datasets.load_dataset arguments with a 'path'")
    dataset = dict(dataset)
    # A hub name ("imdb", "org/name") stays as it is; only a path that exists next to the catalog moves.
    if (base / dataset["path"]).exists():
        dataset["path"] = os.path.normpath(base / dataset["path"])
    files = dataset.get("data_files")
    if isinstance(files, dict):
        dataset["data_files"] = {split: _resolve_files(f, base, where) for split, f in files.items()}
    elif files is not None:
        dataset["data_files"] = _resolve_files(files, base, where)
    return dataset


def _resolve_files(files: Any, base: Path, where: str) -> str | list[str]:
    if isinstance(files, list):
        return [_resolve_file(f, base, where) for f in files]
    return _resolve_file(files, base, where)


def _resolve_file(file: Any, base: Path, where: str) -> str:
    if not isinstance(file, str):
        raise ConfigError(f"{where}.data_files: expected paths, got {file!r}")
    # URLs and fsspec paths (hf://, s3://) are not relative to anything; globs stay globs.
    if "://" in file:
        return file
    return os.path.normpath(base / file)
