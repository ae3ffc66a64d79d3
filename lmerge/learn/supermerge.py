"""SuperMerge: supervised, signed coefficients (tanh) learned on validation data (or fitted to each
task's own adapter's predictions), optionally hierarchically: each group of adapters is merged
first, on its own tasks, then the groups."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lmerge.errors import ConfigError
from lmerge.learn.base import Batch, MergeLearner
from lmerge.learn.coefficients import Coefficients


class SuperMerge(MergeLearner):
    """Minimize the tasks' supervised loss with coefficients in (-1, 1), task- or layer-wise."""

    objective_name = "loss"

    def __init__(
        self,
        catalog: str,
        adapters: list[str],
        tasks: list[str] | None = None,
        variant: Literal["task_wise", "layer_wise", "rank_wise"] = "layer_wise",
        init: float | list[float] = 0.3,
        lr: float = 1e-2,
        hierarchical: dict[str, Any] | None = None,
        targets: Literal["labels", "adapters"] = "labels",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            catalog: Task catalog YAML (task name -> adapter and data).
            adapters: The adapters to merge: catalog task names or adapter directories.
            tasks: The tasks trained on; default: the adapters that are catalog tasks.
            variant: ``task_wise``, ``layer_wise`` (the paper's per-layer formulation) or ``rank_wise`` (per rank
                direction of each module, see ``MergeLearner``).
            init: Initial coefficient value (coefficients are tanh of the raw parameters: signed, unnormalized).
            lr: Adam learning rate.
            hierarchical: ``{enabled: true, groups: [[a, b], [c, d]] (or group_size: 2), stage_steps: 100}``:
                for ``stage_steps`` steps each task sees only its own group's adapters and the coefficients
                within groups learn; then every group is on and one signed weight per group and layer learns
                (the within-group coefficients frozen). The learned coefficient of an adapter is the product.
            targets: What each task's merged predictions are fitted to: ``labels``, the task's labels (the
                paper's cross-entropy); ``adapters``, the predictions of the task's own adapter on the same
                inputs (distillation, ``KL(adapter || merged)``; no label is read, so any split's inputs serve,
                the adapters' training inputs included).
            **kwargs: Shared learner options (see ``MergeLearner``).
        """
        super().__init__(
            catalog, adapters, tasks, granularity=variant, parametrization="tanh", init=init, lr=lr, **kwargs
        )
        self.stage_steps = 0
        if hierarchical and hierarchical.get("enabled", True):
            if variant == "rank_wise":
                raise ConfigError("model.hierarchical: not with variant rank_wise (groups merge adapter-level weights)")
            groups = adapter_groups(hierarchical, [a.name for a in self.adapters])
            self.stage_steps = int(hierarchical.get("stage_steps", 0))
            if self.stage_steps < 1:
                raise ConfigError("model.hierarchical.stage_steps: give the steps of the within-group stage (>= 1)")
            self.coefficients = HierarchicalCoefficients(self.coefficients, groups)

    def on_fit_start(self) -> None:
        # Labels of the test split would leak into the merge that is scored on it; so would the
        # answers a language-model task's batches carry in their inputs (teacher forcing).
        if self.trainer.datamodule.fit_split != "test":
            return
        if self.hparams.targets == "labels":
            raise ConfigError(
                "data.fit_split test: SuperMerge with targets labels would learn from the test labels; "
                "fit on validation (the paper's) or train, or use targets adapters"
            )
        if self.kind.text_answers:
            raise ConfigError(
                f"data.fit_split test: {self.kind} batches hold the answers in their inputs, so SuperMerge would "
                "learn from the test answers; fit on train or validation"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if isinstance(self.coefficients, HierarchicalCoefficients):
            self.coefficients.set_stage(within=self.global_step < self.stage_steps)

    def on_train_end(self) -> None:
        # Whatever stage training stopped in, the learned merge has every group on.
        if isinstance(self.coefficients, HierarchicalCoefficients):
            self.coefficients.set_stage(within=False)
        super().on_train_end()

    def task_logits(self, task: str, batch: Batch) -> torch.Tensor:
        coefficients = self.coefficients
        if isinstance(coefficients, HierarchicalCoefficients) and coefficients.within_stage:
            coefficients.only_group_of(self.adapter_for_task(task))
        return super().task_logits(task, batch)

    def task_objective(self, task: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        # Per-task heads differ in their number of classes, so the loss is computed here; for a
        # causal LM it is the same token-normalized CE the model's own ``loss`` returns.
        if self.hparams.targets == "adapters":
            return self.kind.distillation_loss(logits, self.own_adapter_logits(task, batch), batch)
        return self.kind.loss(logits, batch)


def adapter_groups(config: dict[str, Any], names: list[str]) -> list[list[int]]:
    """Adapter indices per group, from ``groups`` (names) or ``group_size`` (in order)."""
    if config.get("groups"):
        groups = [[_index(names, name) for name in group] for group in config["groups"]]
        flat = sorted(i for group in groups for i in group)
        if flat != list(range(len(names))):
            raise ConfigError("model.hierarchical.groups: every adapter must be in exactly one group")
        return groups
    size = int(config.get("group_size") or 0)
    if size < 1:
        raise ConfigError("model.hierarchical: give groups (lists of adapter names) or group_size")
    return [list(range(start, min(start + size, len(names)))) for start in range(0, len(names), size)]


def _index(names: list[str], name: str) -> int:
    if name not in names:
        raise ConfigError(f"model.hierarchical.groups: {name!r} is not one of the adapters ({', '.join(names)})")
    return names.index(name)


class HierarchicalCoefficients(Coefficients):
    """Coefficients ``tanh(within) * across[group of the adapter]`` per layer group, with a mask
    that keeps one adapter group on while the within-group stage trains."""

    def __init__(self, within: Coefficients, groups: list[list[int]]) -> None:
        super().__init__(within.n_adapters, within.groups, "tanh", 0.0, group_names=within.group_names)
        self.raw = within.raw
        self.adapter_group = [
            next(g for g, members in enumerate(groups) if i in members) for i in range(self.n_adapters)
        ]
        # One signed weight per adapter group and layer group, starting at 1: the groups simply add up.
        self.across = nn.Parameter(torch.ones(within.groups, len(groups)))
        self.register_buffer("mask", torch.ones(self.n_adapters), persistent=False)
        self.within_stage = True

    def forward(self) -> torch.Tensor:
        across = self.across[:, self.adapter_group]
        return torch.tanh(self.raw) * across * self.mask

    def set_stage(self, within: bool) -> None:
        """Train the within-group coefficients (stage 1) or the group weights (stage 2)."""
        self.within_stage = within
        self.raw.requires_grad_(within)
        self.across.requires_grad_(not within)
        if not within:
            self.mask = torch.ones_like(self.mask)

    def only_group_of(self, adapter: int) -> None:
        """Switch every adapter off but those in ``adapter``'s group."""
        group = self.adapter_group[adapter]
        # A new tensor, not an in-place change: earlier tasks' graphs of this step still hold the old mask.
        self.mask = torch.tensor([float(g == group) for g in self.adapter_group], device=self.mask.device)

    @torch.no_grad()
    def set_values(self, values: Any) -> None:
        """Set the product: group weights to 1, the within-group coefficients to ``values``."""
        self.across.fill_(1.0)
        self.mask = torch.ones_like(self.mask)
        super().set_values(values)
