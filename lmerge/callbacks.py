"""Lightning callbacks for coefficient learners: trajectories and heatmaps in TensorBoard,
restoring the best coefficients, and exporting the learned merge at the end of fit."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from lmerge.outputs import check_output_root, run_bundle, write_bytes_atomic, write_json_atomic

CELL = 24  # pixels per heatmap cell


def heatmap(values: list[list[float]]) -> np.ndarray:
    """A [groups x adapters] heatmap as an RGB uint8 image: red positive, blue negative,
    white zero, on a scale set by the largest magnitude (or 1)."""
    grid = np.asarray(values, dtype=np.float64)
    scale = max(float(np.abs(grid).max()), 1.0) if grid.size else 1.0
    level = np.clip(grid / scale, -1.0, 1.0)[..., None]
    white, red, blue = np.array([1.0, 1.0, 1.0]), np.array([0.8, 0.1, 0.1]), np.array([0.1, 0.2, 0.8])
    colors = np.where(level >= 0, white + (red - white) * level, white + (blue - white) * -level)
    image = np.kron(colors, np.ones((CELL, CELL, 1)))
    return (image * 255).round().astype(np.uint8)


def heatmap_png(values: list[list[float]]) -> bytes:
    """The heatmap encoded as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(heatmap(values)).save(buffer, format="PNG")
    return buffer.getvalue()


def _is_learner(module: LightningModule) -> bool:
    return hasattr(module, "coefficients") and hasattr(module, "merge_spec")


class CoefficientLogger(Callback):
    """Logs every coefficient (``coefficients/<group>/<adapter>``) every ``every_n_steps`` steps,
    and a layer x adapter heatmap image to TensorBoard every ``heatmap_every_n_steps``."""

    def __init__(self, every_n_steps: int = 10, heatmap_every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self.heatmap_every_n_steps = heatmap_every_n_steps

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if not _is_learner(pl_module):
            return
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._scalars(pl_module)
        if self.heatmap_every_n_steps and step % self.heatmap_every_n_steps == 0:
            self._image(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _is_learner(pl_module):
            self._image(trainer, pl_module)

    def _scalars(self, pl_module: LightningModule) -> None:
        names = [a.name for a in pl_module.adapters]
        values = pl_module.coefficients.values()
        for group, row in zip(pl_module.coefficients.group_names, values):
            for adapter, value in zip(names, row):
                pl_module.log(f"coefficients/{group}/{adapter}", value)

    @rank_zero_only
    def _image(self, trainer: Trainer, pl_module: LightningModule) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        image = torch.from_numpy(heatmap(pl_module.coefficients.values())).permute(2, 0, 1)
        experiment.add_image("coefficients/heatmap", image, trainer.global_step)


class BestCoefficients(Callback):
    """Keeps the coefficients of the best value of ``monitor`` (checked at each validation end)
    and restores them when fit ends."""

    def __init__(self, monitor: str = "val/loss", mode: Literal["min", "max"] = "min") -> None:
        self.monitor = monitor
        self.mode = mode
        self.best: tuple[float, list[list[float]]] | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not _is_learner(pl_module) or trainer.sanity_checking:
            return
        value = float(value)
        better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
        if better:
            self.best = (value, pl_module.coefficients.values())

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.best is not None:
            pl_module.coefficients.set_values(self.best[1])

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict["best"]


class MergeExport(Callback):
    """At the end of fit, writes the learned merge into a run bundle
    ``<output_dir>/merged/<learner>/<combo>/runs/run_<time>/``: the ``weighted_delta_n`` merge
    spec (``merge_spec.yaml``, runnable with ``lmerge merge --config``), ``coefficients.json`` and
    ``coefficients.png``; with ``save`` other than none it also runs that merge (saving the
    adapter, and evaluating it on ``eval_tasks``)."""

    def __init__(
        self,
        output_dir: str = "artifacts",
        save: Literal["none", "lora", "full"] = "none",
        eval_tasks: list[str] | None = None,
        split: str = "test",
    ) -> None:
        # A bad output root is found before anything is built, not after training.
        self.output_dir = str(check_output_root(output_dir, create=False))
        self.save = save
        self.eval_tasks = eval_tasks
        self.split = split
        self.bundle: Path | None = None

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not _is_learner(pl_module) or trainer.interrupted:
            return
        self.bundle = export_learned_merge(pl_module, self.output_dir, self.save, self.eval_tasks, self.split)


def export_learned_merge(
    learner: LightningModule,
    output_dir: str,
    save: str = "none",
    eval_tasks: list[str] | None = None,
    split: str = "test",
) -> Path:
    """Write the learner's merge spec, coefficients and heatmap into a run bundle; with ``save``
    other than none, run the exported merge too. Returns the bundle's path."""
    from lmerge.config import load_merge_config

    spec = learner.merge_spec()
    values = learner.coefficients.values()
    names = [a.name for a in learner.adapters]
    learner_name = type(learner).__name__.lower()
    record = {
        "learner": type(learner).__name__,
        "groups": learner.coefficients.group_names,
        "adapters": names,
        "values": values,
        "steps": learner.global_step,
        "hyperparameters": dict(learner.hparams),
    }
    with run_bundle(output_dir, learner_name, names) as bundle:
        header = f"# lmerge merge --config <this file>\n# A merge learned by {type(learner).__name__}.\n"
        text = header + yaml.safe_dump(spec, sort_keys=False)
        write_bytes_atomic(bundle.work / "merge_spec.yaml", text.encode())
        write_json_atomic(bundle.work / "coefficients.json", record)
        write_bytes_atomic(bundle.work / "coefficients.png", heatmap_png(values))
    print(f"learned merge: {bundle.final / 'merge_spec.yaml'}")
    if save != "none" or eval_tasks:
        from lmerge.runner import run_merge

        overrides = {"output_dir": output_dir, "save": {"format": save}, "split": split}
        if eval_tasks:
            overrides["eval_tasks"] = eval_tasks
        result = run_merge(load_merge_config(bundle.final / "merge_spec.yaml", **overrides))
        print(f"merged with the learned coefficients: {result.run_dir}")
        if result.evaluation:
            print(result.evaluation.table())
    return bundle.final
