"""Distillation targets kept across fits: each task's own adapter's logits, per example, on disk.

The learners that distil (SuperMerge and regret smooth-max with ``targets: adapters``, AdaMerging's
distillation term) run each example through its task's own adapter alone once per fit and keep
the row (:meth:`~lmerge.learn.base.MergeLearner.own_adapter_logits`). For SuperMerge on the train
split that is a pass per step (on the demo a fit that reads them takes 182 s instead of 216). The
adapters are frozen, so a row depends only on what the key below holds: :class:`TeacherCache`
keeps the rows in one file per task and key, and a fit that learns again from the same adapters
(other learner settings, ``lmerge demo --refit true``) reads them instead of computing them.

The key: the task's catalog fields, every fused adapter by content and which one is the task's
own (the fused low-rank GEMM's shape follows all of them), the base model and tokenizer, how the
model is loaded and fused, the trainer's precision, the kind of device, lmerge's source code and
the versions of the packages that compute the pass. Only kinds with heads keep rows (a language
model's rows are per token, too large to keep).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from safetensors import SafetensorError
from safetensors.torch import load, save

from lmerge.errors import ConfigError
from lmerge.evaluation.baseline_key import (
    COMPUTE_PACKAGES,
    adapter_fingerprint,
    config_digest,
    model_fingerprint,
    package_version,
    source_digest,
    task_fields,
)
from lmerge.learn.base import MergeLearner
from lmerge.outputs import DEFAULT_OUTPUT_DIR, check_output_root, file_lock, write_bytes_atomic

Rows = dict[tuple[int, ...], torch.Tensor]


class TeacherCache(Callback):
    """Distillation targets kept across fits, in ``<export.output_dir>/teacher_logits/``.

    Loads the learner's own-adapter logits when the fit starts and adds the rows this fit computed
    when it ends (under a lock: fits running side by side share a file). ``lmerge fit`` always
    adds it, with the export's ``output_dir``."""

    def __init__(self, output_dir: str = DEFAULT_OUTPUT_DIR, enabled: bool = True) -> None:
        """
        Args:
            output_dir: The outputs' root; the rows go to its ``teacher_logits`` folder, one
                ``<task>-<key>.safetensors`` file per task.
            enabled: Whether to read and keep the rows at all.
        """
        self.root = check_output_root(output_dir)
        self.dirpath = self.root / "teacher_logits"
        self.enabled = enabled
        self.paths: dict[str, Path] = {}
        self.loaded: dict[str, int] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or not isinstance(pl_module, MergeLearner) or not pl_module.kind.has_head:
            return
        keys = teacher_keys(pl_module, trainer.precision)
        self.paths = {task: self.dirpath / f"{task}-{key[:16]}.safetensors" for task, key in keys.items()}
        for task, path in self.paths.items():
            rows = {key: row.to(pl_module.device) for key, row in read_rows(path).items()}
            pl_module.own_logits_seen.setdefault(task, {}).update(rows)
            self.loaded[task] = len(pl_module.own_logits_seen[task])
        if any(self.loaded.values()):
            counts = ", ".join(f"{task} {count}" for task, count in self.loaded.items())
            rank_zero_info(f"distillation targets read from {self.dirpath} (rows: {counts})")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for task, path in self.paths.items():
            seen = pl_module.own_logits_seen.get(task, {})
            if len(seen) == self.loaded.get(task, 0):
                continue  # nothing new to keep
            with file_lock(path.with_suffix(".lock"), root=self.root):
                rows = {**read_rows(path), **{key: row.detach().cpu() for key, row in seen.items()}}
                write_bytes_atomic(path, encode_rows(rows), root=self.root)


def teacher_keys(learner: MergeLearner, precision: str) -> dict[str, str]:
    """Each task's key: the digest of everything its own-adapter logits depend on in ``learner``
    (module doc). A task whose own adapter is not among the merged ones has no targets, so no key.
    What every task shares (adapters, base model, source, packages) is fingerprinted once."""
    hparams = learner.hparams
    shared = config_digest(
        {
            "adapters": [adapter_fingerprint(adapter) for adapter in learner.adapters],
            "base_model": model_fingerprint(str(learner.base_model_path)),
            "model": {name: hparams[name] for name in ("merge_mode", "merge_impl", "model_dtype")},
            "precision": str(precision),
            "device": learner.device.type,
            "source": source_digest(),
            "packages": {name: package_version(name) for name in COMPUTE_PACKAGES},
        }
    )
    keys = {}
    for task, spec in learner.task_specs.items():
        try:
            own = learner.adapter_for_task(task)
        except ConfigError:
            continue
        keys[task] = config_digest({"task": task_fields(spec), "own_adapter": own, "shared": shared})
    return keys


def encode_rows(rows: Rows) -> bytes:
    """``rows`` as safetensors: the logits stacked, each example's tokens concatenated with their offsets."""
    keys = list(rows)
    lengths = torch.tensor([0] + [len(key) for key in keys], dtype=torch.int64)
    tokens = torch.tensor([token for key in keys for token in key], dtype=torch.int64)
    return save({"logits": torch.stack([rows[key] for key in keys]), "tokens": tokens, "offsets": lengths.cumsum(0)})


def read_rows(path: Path) -> Rows:
    """The rows cached in ``path``; none when it is missing or unreadable (they are computed again)."""
    try:
        tensors = load(path.read_bytes())
        logits, tokens, offsets = tensors["logits"], tensors["tokens"].tolist(), tensors["offsets"].tolist()
    except (OSError, KeyError, SafetensorError):
        return {}
    if len(offsets) != len(logits) + 1 or offsets[-1] != len(tokens):
        return {}
    return {tuple(tokens[start:end]): row for start, end, row in zip(offsets, offsets[1:], logits)}
