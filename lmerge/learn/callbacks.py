"""Lightning callbacks for coefficient learners: trajectories and heatmaps in TensorBoard,
restoring the best coefficients, and early stopping on the training loss (the export of the
learned merge is :class:`lmerge.callbacks.MergeExport`)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_only

from lmerge.errors import ConfigError
from lmerge.learn.heatmap import coefficient_heatmap, figure_image


def is_learner(module: LightningModule) -> bool:
    """Whether ``module`` learns merge coefficients (has coefficients and a merge spec)."""
    return hasattr(module, "coefficients") and hasattr(module, "merge_spec")


class CoefficientLogger(Callback):
    """Logs every coefficient (``coefficients/<group>/<adapter>``; for rank-wise coefficients also
    the mean and standard deviation of each adapter's rank coefficients in the group's modules,
    ``coefficients/<group>/<adapter>/rank_mean`` and ``rank_std``) every ``every_n_steps`` steps,
    and the labelled layer x adapter heatmap (``coefficients/heatmap``) every ``heatmap_every_n_steps``."""

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
        for group, adapters in pl_module.coefficients.rank_statistics().items():
            for index, (mean, std) in adapters.items():
                pl_module.log(f"coefficients/{group}/{names[index]}/rank_mean", mean)
                pl_module.log(f"coefficients/{group}/{names[index]}/rank_std", std)

    @rank_zero_only
    def _image(self, trainer: Trainer, pl_module: LightningModule) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        coefficients = pl_module.coefficients
        names = [a.name for a in pl_module.adapters]
        figure = coefficient_heatmap(coefficients.display_values(), coefficients.group_names, names)
        image = torch.from_numpy(figure_image(figure)).permute(2, 0, 1)
        experiment.add_image("coefficients/heatmap", image, trainer.global_step)


class KeepsBestCoefficients(Callback):
    """Keeps the coefficients of the best value of ``monitor`` seen so far and restores them when
    training ends (before fit's end, where the merge export reads them); subclasses say when the
    value is read."""

    def __init__(self, monitor: str, mode: Literal["min", "max"] = "min") -> None:
        self.monitor = monitor
        self.mode = mode
        self.best: tuple[float, list[list[float]]] | None = None

    def _consider(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not is_learner(pl_module):
            return
        value = float(value)
        better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
        if better:
            self.best = (value, pl_module.coefficients.snapshot())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.best is not None:
            pl_module.coefficients.restore(self.best[1])

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict["best"]


class BestCoefficients(KeepsBestCoefficients):
    """Keeps the coefficients of the best value of ``monitor`` (checked at each validation end)
    and restores them when fit ends."""

    def __init__(self, monitor: str = "val/loss", mode: Literal["min", "max"] = "min") -> None:
        super().__init__(monitor, mode)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._consider(trainer, pl_module)


class BestStepCoefficients(KeepsBestCoefficients):
    """Keeps the coefficients (as they are after the step) of the best value of ``monitor`` that a
    training step logged (checked after every step) and restores them when fit ends. A learner's
    ``restore_best_checkpoint`` adds one on ``train/loss``; not a subclass of ``BestCoefficients``,
    so Lightning keeps a configured ``BestCoefficients`` beside it."""

    def __init__(self, monitor: str = "train/loss", mode: Literal["min", "max"] = "min") -> None:
        super().__init__(monitor, mode)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._consider(trainer, pl_module)


class StepEarlyStopping(Callback):
    """Stops fit when a value that every training step logs (``train/loss``) stops improving:
    Lightning's ``EarlyStopping`` rule (``patience`` checks without an improvement larger than
    ``min_delta``), checked after every step from ``warmup_steps`` on, and never stopping before
    ``min_steps`` steps. A learner's ``early_stopping_*`` arguments add one.

    It holds an ``EarlyStopping`` rather than being one: Lightning replaces the trainer's callbacks
    of a class that a learner's own callback subclasses, and a configured ``EarlyStopping`` on
    validation (``callbacks/early_stopping.yaml``) must stay beside this one."""

    def __init__(
        self,
        monitor: str = "train/loss",
        min_delta: float = 0.0,
        patience: int = 3,
        mode: Literal["min", "max"] = "min",
        warmup_steps: int = 0,
        min_steps: int = 0,
    ) -> None:
        # A non-finite value counts as no improvement, like any other.
        self.rule = EarlyStopping(monitor, min_delta=min_delta, patience=patience, mode=mode, check_finite=False)
        self.warmup_steps = warmup_steps
        self.min_steps = min_steps

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step < self.warmup_steps:
            return
        value = trainer.callback_metrics.get(self.rule.monitor)
        if value is None:
            logged = ", ".join(trainer.callback_metrics) or "nothing"
            raise ConfigError(f"StepEarlyStopping: training steps log no {self.rule.monitor!r} (they log {logged})")
        exhausted, _ = self.rule._evaluate_stopping_criteria(value.squeeze())
        # Every process decides at every step, so the reduction cannot hang; any one stopping stops all.
        stop = trainer.strategy.reduce_boolean_decision(exhausted and step >= self.min_steps, all=False)
        trainer.should_stop = trainer.should_stop or stop

    def state_dict(self) -> dict[str, Any]:
        return self.rule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rule.load_state_dict(state_dict)
