"""Lightning callbacks for coefficient learners: trajectories and heatmaps in TensorBoard,
and restoring the best coefficients (the export of the learned merge is
:class:`lmerge.pipeline.MergeExport`)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from lmerge.learn.heatmap import heatmap


def is_learner(module: LightningModule) -> bool:
    """Whether ``module`` learns merge coefficients (has coefficients and a merge spec)."""
    return hasattr(module, "coefficients") and hasattr(module, "merge_spec")


class CoefficientLogger(Callback):
    """Logs every coefficient (``coefficients/<group>/<adapter>``) every ``every_n_steps`` steps,
    and a layer x adapter heatmap image to TensorBoard every ``heatmap_every_n_steps``."""

    def __init__(self, every_n_steps: int = 10, heatmap_every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self.heatmap_every_n_steps = heatmap_every_n_steps

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if not is_learner(pl_module):
            return
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._scalars(pl_module)
        if self.heatmap_every_n_steps and step % self.heatmap_every_n_steps == 0:
            self._image(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if is_learner(pl_module):
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
        if value is None or not is_learner(pl_module) or trainer.sanity_checking:
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
