"""``MergeLearner``: the LightningModule every coefficient learner builds on.

It holds the base model with every targeted linear fused over all adapters' LoRA factors
(``lmerge.learn.fused``), one frozen head per task where the task kind has heads, and the merge
coefficients, which are its only trainable parameters (and the only tensors its checkpoints keep).
Subclasses define the per-task objective and how task terms combine.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from torch import nn

from lmerge.adapters.align import align_keys, check_compatible
from lmerge.adapters.lora import LoraAdapter
from lmerge.errors import ConfigError
from lmerge.learn.averaging import CoefficientAverage
from lmerge.learn.callbacks import BestStepCoefficients, KeepsBestCoefficients, StepEarlyStopping
from lmerge.learn.coefficients import Coefficients
from lmerge.learn.fused import attach, layer_groups
from lmerge.learn.merged_linear import factor_dtype
from lmerge.learn.rank_coefficients import RankCoefficients
from lmerge.learn.sharding import average_replicated_gradients, shard_base_model
from lmerge.tasks.models import DTYPES, load_model
from lmerge.tasks.resolve import resolve_adapters
from lmerge.tasks.spec import catalog_tasks, load_task_catalog

Batch = dict[str, Any]

# Learners keep the frozen model in eval mode on purpose (no dropout while learning coefficients),
# and Lightning 2.6's CombinedLoader trips a torch deprecation of its own: neither is the user's concern.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")


# Trainer precisions that cast the whole LightningModule, the coefficients included, to half.
HALF_PRECISIONS = ("bf16-true", "16-true")


def resolve_model_dtype(name: str, device_type: str) -> torch.dtype | None:
    """The dtype to load the base model in for ``model_dtype`` ``name``: ``auto`` is float32 on
    CPU and the checkpoint's own dtype (None) on an accelerator; the others are what they say."""
    if name == "auto" and device_type == "cpu":
        return torch.float32
    return DTYPES[name]


class MergeLearner(LightningModule):
    """Learns merge coefficients of ``adapters`` on the tasks of a catalog. A subclass defines
    ``task_objective(task, logits, batch) -> Tensor`` (one task's term) and may override ``combine``."""

    def __init__(
        self,
        catalog: str,
        adapters: list[str],
        tasks: list[str] | None = None,
        granularity: Literal["task_wise", "layer_wise", "rank_wise"] = "task_wise",
        parametrization: Literal["clamp", "sigmoid", "tanh", "softmax", "none"] = "clamp",
        init: float | list[float] = 0.3,
        lr: float = 1e-3,
        merge_mode: Literal["common", "strict"] = "common",
        merge_impl: Literal["fused_lora_linear", "dense"] = "fused_lora_linear",
        model_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "fp32",
        base_model: str | None = None,
        early_stopping_patience: int = 0,
        early_stopping_threshold: float = 0.0,
        early_stopping_warmup_steps: int = 0,
        min_optimizer_steps_before_early_stop: int = 0,
        restore_best_checkpoint: bool = False,
        rank_wise_decay: float = 0.0,
        rank_mixing_lr: float | None = None,
        coefficient_average: float = 0.0,
    ) -> None:
        """
        Args:
            catalog: Task catalog YAML (task name -> adapter and data).
            adapters: The adapters to merge: catalog task names or adapter directories.
            tasks: The tasks trained on (their heads are loaded); default: the adapters that are catalog tasks.
            granularity: ``task_wise``: one coefficient per adapter; ``layer_wise``: one per adapter and layer;
                ``rank_wise``: one per rank direction of each adapter in each module, starting at its layer-wise
                coefficient (``lmerge.learn.rank_coefficients``), exported as a ``weighted_rank`` merge.
            parametrization: How raw parameters map to coefficients (clamp [0,1], sigmoid, tanh, softmax, none).
            init: Initial coefficient value (or one per adapter).
            lr: Adam learning rate of the coefficients.
            merge_mode: ``common`` merges the modules all adapters share; ``strict`` fails on any difference.
            merge_impl: ``fused_lora_linear`` (two GEMMs per module) or ``dense`` (the reference).
            model_dtype: Dtype the base model is loaded in (``auto``: float32 on CPU, the checkpoint's on an
                accelerator); the coefficients stay in float32, the merged low-rank path too but under
                ``bf16-mixed``/``16-mixed`` on an accelerator (its GEMMs run in half there anyway).
            base_model: Base model directory; default: the adapters' ``base_model_name_or_path``.
            early_stopping_patience: Stop after this many steps without improvement of the training loss
                (0: never); adds a ``StepEarlyStopping`` callback (``lmerge.learn.callbacks``).
            early_stopping_threshold: Smallest loss decrease that counts as an improvement.
            early_stopping_warmup_steps: Steps before patience is tracked.
            min_optimizer_steps_before_early_stop: Steps before early stopping may stop the run.
            restore_best_checkpoint: End with the coefficients of the lowest minibatch loss; adds a
                ``BestStepCoefficients`` callback.
            rank_wise_decay: With ``rank_wise``: weight of the L2 pull of each rank coefficient toward its
                adapter's layer-wise coefficient (0: none), and of each rank-mixing matrix toward 0.
            rank_mixing_lr: With ``rank_wise``: also learn an ``R x R`` matrix per module that mixes its rank
                directions (``B_cat (diag(c) + N) A_cat``, each ``B_i`` scaled; ``N`` from 0, unconstrained),
                at this Adam learning rate; None: no mixing. Still an exact LoRA of rank ``R``.
            coefficient_average: Decay of an exponential moving average of the coefficients' parameters, updated
                after every optimizer step (0: none). Validation, and so ``BestCoefficients`` and early stopping,
                reads the average, and the learned merge is the last average or the best validated one: it smooths
                the jitter that small batches give each step's coefficients (Polyak averaging). Training goes on
                from the coefficients themselves.
        """
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"model.lr: must be a positive number, got {lr}")
        self.save_hyperparameters()
        self.adapters = resolve_adapters(adapters, catalog)
        check_compatible(self.adapters)
        self.keys, self.dropped_keys = align_keys(self.adapters, merge_mode)
        if tasks is None:
            in_catalog = load_task_catalog(catalog)
            tasks = [a.name for a in self.adapters if a.name in in_catalog]
        self.task_specs = {spec.name: spec for spec in catalog_tasks(catalog, tasks, key="model.tasks")}
        if not self.task_specs:
            raise ConfigError("model.tasks: no task to train on; name catalog tasks")
        kinds = {spec.task_kind for spec in self.task_specs.values()}
        if len(kinds) > 1:
            shown = ", ".join(sorted(map(str, kinds)))
            raise ConfigError(f"model.tasks: tasks of different kinds cannot share one model ({shown})")
        self.kind = next(iter(self.task_specs.values())).task_kind
        self.group_names, self.group_layers, self.group_of = layer_groups(self.keys, granularity)
        if not 0 <= coefficient_average < 1:
            raise ConfigError(f"model.coefficient_average: a decay in [0, 1), got {coefficient_average}")
        if rank_mixing_lr is not None and not rank_mixing_lr > 0:
            raise ConfigError(
                f"model.rank_mixing_lr: a positive learning rate with granularity rank_wise, got {rank_mixing_lr}"
            )
        self.coefficients = self._coefficients(
            granularity, parametrization, init, rank_wise_decay, mixing=rank_mixing_lr is not None
        )
        self.base_model_path = base_model or self.adapters[0].base_model
        if not self.base_model_path:
            raise ConfigError("model.base_model: the adapters do not name their base model; give its directory")
        self.model: nn.Module | None = None
        self.heads = nn.ModuleDict()
        self.average = CoefficientAverage(coefficient_average) if coefficient_average else None
        # Task -> an example's tokens -> its own adapter's logits (see ``own_adapter_logits``).
        self.own_logits_seen: dict[str, dict[tuple[int, ...], torch.Tensor]] = {}
        # Checkpoints hold the coefficients only; the frozen model is rebuilt from its files.
        self.strict_loading = False

    def _coefficients(
        self, granularity: str, parametrization: str, init: float | list[float], decay: float, mixing: bool
    ) -> Coefficients:
        args = (len(self.adapters), len(self.group_names), parametrization, init)
        if granularity != "rank_wise":
            if decay:
                raise ConfigError("model.rank_wise_decay: only granularity rank_wise has rank coefficients")
            if mixing:
                raise ConfigError(
                    f"model.rank_mixing_lr: a positive learning rate with granularity rank_wise, not {granularity}"
                )
            return Coefficients(*args, group_names=self.group_names)
        if self.hparams.merge_impl != "fused_lora_linear":
            raise ConfigError("model.merge_impl: granularity rank_wise needs fused_lora_linear (the factors' rows)")
        ranks = {key: [adapter.shapes[key].rank for adapter in self.adapters] for key in self.keys}
        groups = {key: self.group_of(key) for key in self.keys}
        return RankCoefficients(*args, self.group_names, ranks, groups, decay, mixing)

    # ---- the model --------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the base model, fuse the adapters into it and build the task heads (once)."""
        if self.model is not None:
            return
        dtype = resolve_model_dtype(self.hparams.model_dtype, self._device_type())
        model = load_model(self.base_model_path, self.kind, dtype).requires_grad_(False).eval()
        weight_dtype = next(model.parameters()).dtype
        # The merged path in at least float32 (the base weights may be half), or in the autocast dtype
        # under mixed precision, where its GEMMs run in half anyway; c_rep stays float32.
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        path_dtype = factor_dtype(weight_dtype, precision)
        impl = self.hparams.merge_impl
        self.fused = attach(model, self.adapters, self.keys, self.coefficients, self.group_of, impl, path_dtype)
        self.model = model
        if self._trainer is not None:
            shard_base_model(self._trainer.strategy, model, self.coefficients)
        if self.kind.has_head:
            for name, spec in self.task_specs.items():
                if not spec.adapter:
                    raise ConfigError(f"task {name}: the catalog names no adapter, so it has no head")
                head_state = self.kind.adapter_head(spec, LoraAdapter(spec.adapter, name=name))
                if not head_state:
                    raise ConfigError(f"task {name}: its adapter saved no head (modules_to_save)")
                self._head_path, head = self.kind.build_head(model, head_state)
                self.heads[name] = head.to(weight_dtype)  # heads are saved in the adapter's dtype

    def _device_type(self) -> str:
        """The trainer's device type (``cpu`` without a trainer)."""
        return self._trainer.strategy.root_device.type if self._trainer is not None else "cpu"

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if precision in HALF_PRECISIONS:
            raise ConfigError(
                f"trainer.precision {precision}: it would cast the coefficients to half precision; use "
                f"{precision.replace('-true', '-mixed')}, with model.model_dtype bf16 or fp16 to hold the model in half"
            )

    def train(self, mode: bool = True) -> MergeLearner:
        # Dropout stays off: the coefficients are learned on the deterministic merged function.
        super().train(mode)
        if self.model is not None:
            self.model.eval()
        self.heads.eval()
        return self

    def task_logits(self, task: str, batch: Batch) -> torch.Tensor:
        """The merged model's logits on one task's batch (one backbone pass, the task's head)."""
        if self.kind.has_head:
            self.model.set_submodule(self._head_path, self.heads[task])
        return self.kind.logits(self.model, batch)

    # ---- what subclasses define: task_objective(task, logits, batch) -> term, and maybe combine -----
    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss from the per-task terms (default: their sum)."""
        return torch.stack(list(terms.values())).sum()

    objective_name = "objective"

    # ---- training -----------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        mixing = getattr(self.coefficients, "mixing", None)
        if mixing is None:
            return torch.optim.Adam(self.coefficients.parameters(), lr=self.hparams.lr)
        # The rank-mixing matrices learn at their own rate: they start at 0, with R^2 entries per module.
        own = [p for name, p in self.coefficients.named_parameters() if not name.startswith("mixing.")]
        groups = [{"params": own}, {"params": list(mixing.parameters()), "lr": self.hparams.rank_mixing_lr}]
        return torch.optim.Adam(groups, lr=self.hparams.lr)

    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> torch.Tensor:
        terms = {task: self.task_objective(task, self.task_logits(task, b), b) for task, b in batch.items()}
        loss = self.combine(terms)
        penalty = self.coefficients.penalty()
        if penalty is not None:
            self.log("train/rank_wise_decay", penalty)
            loss = loss + penalty
        self.log("train/loss", loss, prog_bar=True)
        for task, term in terms.items():
            self.log(f"train/{self.objective_name}/{task}", term)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        average_replicated_gradients(self.trainer.strategy, self.coefficients)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Inside the step, so callbacks (checkpoints, trajectories) only ever see projected coefficients.
        self.coefficients.project_()
        if self.average is not None:
            self.average.update(self.coefficients)

    def on_validation_start(self) -> None:
        if self.average is not None:
            self.average.swap_in(self.coefficients)

    def on_validation_end(self) -> None:
        # After the callbacks' on_validation_end: they kept, or checked, the average.
        if self.average is not None:
            self.average.swap_back(self.coefficients)

    def on_train_end(self) -> None:
        # After the callbacks' on_train_end: one that kept the best validated coefficients restored
        # them (an average already); otherwise the learned merge is the last average.
        restored = any(isinstance(c, KeepsBestCoefficients) and c.best is not None for c in self.trainer.callbacks)
        if self.average is not None and not restored:
            self.average.apply(self.coefficients)

    def configure_callbacks(self) -> list[Callback]:
        """The early stopping and best-coefficient restore on the training loss that the init
        arguments ask for (Lightning adds them after the trainer's own callbacks)."""
        callbacks: list[Callback] = []
        if self.hparams.early_stopping_patience > 0:
            stopping = StepEarlyStopping(
                "train/loss",
                min_delta=self.hparams.early_stopping_threshold,
                patience=self.hparams.early_stopping_patience,
                warmup_steps=self.hparams.early_stopping_warmup_steps,
                min_steps=self.hparams.min_optimizer_steps_before_early_stop,
            )
            callbacks.append(stopping)
        if self.hparams.restore_best_checkpoint:
            callbacks.append(BestStepCoefficients("train/loss"))
        return callbacks

    # ---- validation and test ------------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step("val", batch, dataloader_idx)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step("test", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        # One number to monitor (early stopping, best coefficients): the mean over the tasks.
        losses = [v for k, v in self.trainer.callback_metrics.items() if k.startswith("val/loss/")]
        if losses:
            self.log("val/loss", torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in losses]).mean())

    def _evaluation_step(self, stage: str, batch: Batch, dataloader_idx: int) -> None:
        split = "validation" if stage == "val" else "test"
        task = self.trainer.datamodule.split_tasks(split)[dataloader_idx]
        if task not in self.task_specs:
            return
        logits = self.task_logits(task, batch)
        options = {"add_dataloader_idx": False, "batch_size": len(batch["input_ids"])}
        self.log(f"{stage}/loss/{task}", self.kind.loss(logits, batch), **options)
        accuracy = self.kind.accuracy(logits, batch)
        if accuracy is not None:
            self.log(f"{stage}/accuracy/{task}", accuracy, **options)

    # ---- checkpoints and export ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The callbacks' state (early stopping, best coefficients) travels in the checkpoint too.
        state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("coefficients.")}
        average = self.average
        if average is not None and average.trained is not None:  # saved while validation runs on the average
            names = [f"coefficients.{name}" for name, _ in self.coefficients.named_parameters()]
            state.update(zip(names, average.trained, strict=True))
        checkpoint["state_dict"] = state
        if average is not None and average.values is not None:
            checkpoint["coefficient_average"] = [a.detach().clone() for a in average.values]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.average is not None and checkpoint.get("coefficient_average") is not None:
            self.average.values = list(checkpoint["coefficient_average"])

    @contextlib.contextmanager
    def fixed_coefficients(self, values: list[list[float]]) -> Iterator[None]:
        """Run the fused model with ``values`` as its coefficients (e.g. one adapter alone)."""
        fixed = Coefficients(len(self.adapters), len(self.group_names), "none", 0.0).to(self.device)
        fixed.set_values(values)
        with self.fused.use_coefficients(fixed):
            yield

    def own_adapter_alone(self, task: str) -> contextlib.AbstractContextManager[None]:
        """Run the fused model as ``task``'s own adapter alone (one-hot coefficients)."""
        return self.fixed_coefficients(self.one_hot(self.adapter_for_task(task)))

    def own_adapter_logits(self, task: str, batch: Batch) -> torch.Tensor:
        """The logits of ``task``'s own adapter alone on ``batch`` (no gradient): a distillation
        target. Where they are one row per example (kinds with heads), each example's row is kept by
        its tokens (``own_logits_seen``): the adapters are frozen, so a batch whose examples were all
        seen before needs no pass (AdaMerging reads the test split's few hundred inputs per task
        again every few dozen steps)."""
        if not self.kind.has_head:
            return self._own_adapter_pass(task, batch)
        seen = self.own_logits_seen.setdefault(task, {})
        keys = example_tokens(batch)
        if all(key in seen for key in keys):
            return torch.stack([seen[key] for key in keys])
        logits = self._own_adapter_pass(task, batch)
        seen.update(zip(keys, logits))
        return logits

    def _own_adapter_pass(self, task: str, batch: Batch) -> torch.Tensor:
        with torch.no_grad(), self.own_adapter_alone(task):
            return self.task_logits(task, batch)

    def one_hot(self, adapter_index: int) -> list[list[float]]:
        """Coefficients that select one adapter alone, in every group."""
        return [[1.0 if i == adapter_index else 0.0 for i in range(len(self.adapters))] for _ in self.group_names]

    def merge_spec(self) -> dict[str, Any]:
        """The learned merge as a config that ``lmerge merge`` reproduces (``weighted_delta_n``, or
        ``weighted_rank`` for rank-wise coefficients)."""
        signed = self.coefficients.parametrization.signed
        spec = self.coefficients.merge_spec(self.hparams.adapters, self.group_layers, signed)
        return {**spec, "catalog": self.hparams.catalog, "merge_mode": self.hparams.merge_mode}

    def adapter_for_task(self, task: str) -> int:
        """Index of the adapter that belongs to ``task`` (same name, or the catalog's adapter)."""
        names = [a.name for a in self.adapters]
        if task in names:
            return names.index(task)
        spec = self.task_specs[task]
        paths = [str(a.path.resolve()) for a in self.adapters]
        if spec.adapter and spec.adapter in paths:
            return paths.index(spec.adapter)
        raise ConfigError(f"task {task}: none of the merged adapters is its own, so it has no single-task baseline")


def example_tokens(batch: Batch) -> list[tuple[int, ...]]:
    """Each example's input tokens, padding left out: what identifies it in any batch."""
    ids, mask = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    return [tuple(t for t, keep in zip(row, keep_row) if keep) for row, keep_row in zip(ids, mask)]
