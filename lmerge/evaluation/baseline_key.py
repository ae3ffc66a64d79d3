"""The key of a cached single-task baseline: everything its number depends on; and the same for a
sweep's stored scores (:func:`scores_fingerprint`).

A baseline is reused only when every part of its key is unchanged: the scoring code (a version
bumped when scoring changes, and lmerge's version), the task's spec (every catalog field), the
content of its data files, the split and the task's eval subset, the task kind it is scored as
(with its resolved pooling), the adapter (its weights, its config, and the files of a pooled task
head saved beside it), the base model and tokenizer, the precision and the kind of device. Files
are identified by a SHA-256 of their content, except a base model's large weight files (by size
and modification time: hashing gigabytes on every run would cost more than the evaluation it
saves).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from lmerge.adapters.lora import LoraAdapter
from lmerge.data import TaskSpec
from lmerge.data.subsets import max_samples_for, parse_eval_subset
from lmerge.tasks.heads import head_paths

COMPUTE_PACKAGES = ("torch", "transformers", "peft", "lightning")
"""Packages whose versions enter the keys of learned results: they compute a learner's steps."""
SOURCE_ROOT = Path(__file__).resolve().parents[1]
"""lmerge's package directory, whose Python files enter those keys (:func:`source_digest`)."""
SCORING_VERSION = 1
"""Bumped whenever a change to lmerge changes the number a baseline would get."""
_HASHED_BYTES = 64 << 20
"""Files of a base model up to this size (configs, tokenizers) are identified by their content."""
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
"""Content digests of files already hashed in this process, by path, inode, size and times."""


def baseline_key(
    task: TaskSpec,
    adapter: LoraAdapter,
    *,
    base_model: str,
    split: str,
    eval_subset: dict[str, Any] | None,
    precision: str,
    device: str,
    kind: str,
) -> dict[str, Any]:
    """The key of ``task``'s baseline (its own ``adapter`` alone on ``base_model``, scored as the
    task kind ``kind``: e.g. with the pooling it resolved to), as JSON values."""
    subset = parse_eval_subset(eval_subset)
    return {
        "scoring_version": SCORING_VERSION,
        "lmerge_version": package_version("lmerge"),
        "task": task_fields(task),
        "task_kind": kind,
        "data": data_fingerprint(task.dataset),
        "split": split,
        "subset": {
            "enabled": subset["enabled"],
            "seed": subset["seed"],
            "shuffle": subset["shuffle"],
            "stratified": subset["stratified"],
            "max_samples": max_samples_for(eval_subset, task.name),
        },
        "adapter": adapter_fingerprint(adapter),
        "base_model": model_fingerprint(base_model),
        "precision": precision,
        "device": device,
    }


def scores_fingerprint(tasks: list[TaskSpec], merged: list[LoraAdapter], *, base_model: str, precision: str) -> str:
    """A digest of everything but a merge's own parameters that its scores on ``tasks`` and their
    interference deltas depend on: the ``merged`` adapters, each task's spec, data and own adapter
    (its baseline), the base model and tokenizer, the precision and the scoring code. Made of
    contents only (no paths, no modification times; a base model's large weight files by size),
    so that every machine sharing a sweep computes the same one."""
    portable = {}
    for task in tasks:
        fields = task_fields(task)
        dataset = dict(fields.pop("dataset") or {})
        data = sorted(data_fingerprint(dataset).values())
        dataset.pop("data_files", None)
        if Path(str(dataset.get("path"))).is_absolute():
            dataset["path"] = "local"  # its files enter by their content
        own = adapter_fingerprint(LoraAdapter(task.adapter)) if task.adapter else None
        portable[task.name] = {**fields, "dataset": dataset, "data": data, "adapter": own}
    model = model_fingerprint(base_model)
    if "files" in model:
        sizes = {name: value.split(":")[0] for name, value in model["files"].items() if ":" in value}
        model = {"files": {**model["files"], **sizes}}
    return _json_digest(
        {
            "scoring_version": SCORING_VERSION,
            "lmerge_version": package_version("lmerge"),
            "merged": [adapter_fingerprint(adapter) for adapter in merged],
            "tasks": portable,
            "base_model": model,
            "precision": precision,
        }
    )[:16]


def adapter_fingerprint(adapter: LoraAdapter) -> dict[str, Any]:
    """An adapter's identity: the digests of its weights (a head PEFT saved among them), its
    config and the files of a pooled task head saved beside it."""
    heads = {path.name: file_digest(path) for path in head_paths(adapter.path) if path.is_file()}
    return {"weights_sha256": adapter.sha256, "config_sha256": config_digest(adapter.config), "head_files": heads}


def task_fields(task: TaskSpec) -> dict[str, Any]:
    """Every catalog field of ``task`` (its name and adapter path aside: the adapter enters by its
    content), nested settings as plain mappings."""
    fields = {}
    for f in dataclasses.fields(task):
        if f.init and f.name not in ("name", "adapter"):
            value = getattr(task, f.name)
            is_settings = dataclasses.is_dataclass(value) and not isinstance(value, type)
            fields[f.name] = dataclasses.asdict(value) if is_settings else value
    return fields


def key_digest(key: dict[str, Any]) -> str:
    """A short, stable digest of a baseline key (what a cached record is matched on)."""
    return _json_digest(key)


def data_fingerprint(dataset: dict[str, Any] | None) -> dict[str, str]:
    """Local data file -> SHA-256 of its content, for every file the task's ``data_files`` (and a
    local ``path``) name; a hub dataset is identified by its arguments, part of the task's spec."""
    if not dataset:
        return {}
    names: list[str] = []
    files = dataset.get("data_files")
    for entry in files.values() if isinstance(files, dict) else [files]:
        names += entry if isinstance(entry, list) else [entry] if isinstance(entry, str) else []
    local = Path(dataset["path"])
    if local.is_file():
        names.append(str(local))
    elif local.is_dir():
        names += [str(p) for p in sorted(local.rglob("*")) if p.is_file()]
    digests = {}
    for name in names:
        for path in sorted(glob.glob(name)) if glob.has_magic(name) else [name]:
            if Path(path).is_file():
                digests[path] = file_digest(Path(path))
    return digests


def model_fingerprint(base_model: str) -> dict[str, Any]:
    """A base model's identity: its name, and for a local directory each file's content digest
    (weights over 64 MiB: size and modification time). Its tokenizer's files are among them."""
    root = Path(base_model)
    if not root.is_dir():
        return {"name": base_model}
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        relative = str(path.relative_to(root))
        files[relative] = file_digest(path) if stat.st_size <= _HASHED_BYTES else f"{stat.st_size}:{stat.st_mtime_ns}"
    return {"name": str(root.resolve()), "files": files}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content, computed once per process while the file is unchanged."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of a JSON-like value (an adapter's config, a run's identity), independent of key order."""
    return _json_digest(config)


def _json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def package_version(package: str) -> str:
    """The installed version of ``package`` ("unknown" when it is not installed as a distribution),
    looked up once per process: a lookup scans the installed distributions (a few ms each, for
    every merge's metadata and every cache key)."""
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def source_digest(root: Path = SOURCE_ROOT) -> str:
    """A digest of the content of every Python file of lmerge: any change to the code changes it."""
    files = sorted(root.rglob("*.py"))
    return config_digest({str(path.relative_to(root)): file_digest(path) for path in files})
