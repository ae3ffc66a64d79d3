"""``LoraFinetune``: train one task's LoRA adapter (and head) with PEFT and save it in PEFT
format (a pooled classification head beside it), for users who have no adapters yet (and for the
demo's benchmark)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_only

from lmerge.errors import ConfigError
from lmerge.outputs import remove_tree, rename, staged_dir
from lmerge.tasks.models import load_model
from lmerge.tasks.spec import catalog_tasks


class LoraFinetune(LightningModule):
    """Fine-tunes a LoRA adapter for one catalog task and saves it where the catalog points."""

    def __init__(
        self,
        catalog: str,
        tasks: list[str],
        base_model: str,
        output_dir: str | None = None,
        r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.1,
        target_modules: list[str] | None = None,
        use_rslora: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        micro_batches: int = 1,
    ) -> None:
        """
        Args:
            catalog: Task catalog YAML (task name -> adapter and data).
            tasks: The one task to fine-tune on.
            base_model: Base model directory.
            output_dir: Where the adapter is saved; default: the task's ``adapter`` path in the catalog.
            r: LoRA rank.
            lora_alpha: LoRA alpha (scaling alpha / r).
            lora_dropout: Dropout on the LoRA input.
            target_modules: Module names to adapt; default: PEFT's choice for the model type.
            use_rslora: Scale by alpha / sqrt(r).
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            micro_batches: Run each training batch as up to this many parts of examples of similar
                lengths, each padded only to its own longest (the cuts with the fewest padded tokens):
                the same loss and gradient as the whole batch (up to rounding; dropout draws differ),
                fewer tokens to compute when lengths vary. 1: the batch as it is.
        """
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"model.lr: must be a positive number, got {lr}")
        if micro_batches < 1:
            raise ConfigError(f"model.micro_batches: must be at least 1, got {micro_batches}")
        self.save_hyperparameters()
        if len(tasks) != 1:
            raise ConfigError(f"model.tasks: LoraFinetune trains one task at a time, got {len(tasks)}")
        self.task = tasks[0]
        self.spec = catalog_tasks(catalog, [self.task], key="model.tasks")[0]
        # The kind the new adapter is trained for (a classification task: the pooling for this base model).
        self.kind = self.spec.task_kind.resolve(self.spec, base_model)
        self.output_dir = output_dir or self.spec.adapter
        if not self.output_dir:
            raise ConfigError(f"model.output_dir: task {self.task} has no adapter path in the catalog; give one")
        self.model_options = self.kind.finetune_options(self.spec)
        self.model: torch.nn.Module | None = None
        self.strict_loading = False

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from peft import LoraConfig, get_peft_model

        base = load_model(self.hparams.base_model, self.kind, torch.float32, **self.model_options)
        config = LoraConfig(
            task_type=self.kind.peft_task_type(base.config.is_encoder_decoder),
            r=self.hparams.r,
            lora_alpha=self.hparams.lora_alpha,
            lora_dropout=self.hparams.lora_dropout,
            target_modules=self.hparams.target_modules,
            use_rslora=self.hparams.use_rslora,
        )
        self.model = get_peft_model(base, config)
        self.kind.new_head(self.model, self.spec)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.kind.logits(self.model, batch)
        return self.kind.loss(logits, batch), logits

    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> torch.Tensor:
        batch = batch[self.task]
        parts = self.kind.split(batch, self.hparams.micro_batches) if self.hparams.micro_batches > 1 else []
        # Counted only when splitting (for answer tokens each count is a device sync); the batch's
        # terms are its parts'.
        counts = [self.kind.loss_terms(part) for part in parts]
        terms = sum(counts)
        if terms:
            # Each part's mean loss weighted by its share of the batch's terms: the batch's mean loss.
            loss = sum(
                self._loss(part)[0] * (count / terms) for part, count in zip(parts, counts, strict=True) if count
            )
        else:
            loss = self._loss(batch)[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        loss, logits = self._loss(batch)
        options = {"add_dataloader_idx": False, "batch_size": len(batch["input_ids"]), "prog_bar": True}
        self.log(f"val/loss/{self.task}", loss, **options)
        # The same number under one name, so that a shared config can monitor it for any task.
        self.log("val/loss", loss, **options)
        accuracy = self.kind.accuracy(logits, batch)
        if accuracy is not None:
            self.log(f"val/accuracy/{self.task}", accuracy, **options)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    @rank_zero_only
    def on_train_end(self) -> None:
        self.restore_best()
        self.save_adapter(self.output_dir)

    def restore_best(self) -> None:
        """Load the best checkpoint of a checkpoint callback that monitors a score (e.g. the
        validation loss), so that the adapter saved is the best one seen, not the last."""
        callback = self.trainer.checkpoint_callback
        if callback is None or callback.monitor is None or not callback.best_model_path:
            return
        # Our own checkpoint, written by this fit: it holds the trainable weights only.
        state = torch.load(callback.best_model_path, map_location=self.device, weights_only=True)["state_dict"]
        missing = {name for name, p in self.named_parameters() if p.requires_grad} - set(state)
        if missing:
            raise ConfigError(f"{callback.best_model_path}: the checkpoint lacks {sorted(missing)[0]}")
        self.load_state_dict(state, strict=False)

    def save_adapter(self, path: str | Path) -> Path:
        """Save the adapter (and head) in PEFT format, replacing ``path`` only once complete."""
        path = Path(path)
        root = path.parent  # the folder the user named the adapter in: nothing is written outside it
        previous = path.with_name(f".{path.name}.previous")
        with staged_dir(root, lambda taken: path, root=root) as staged:
            self.model.save_pretrained(staged.work)
            self.kind.save_head(self.model, self.spec, staged.work)
            if path.exists():
                # The old adapter stays until the new one is whole; then the two renames swap them.
                rename(path, previous, root=root)
        remove_tree(previous, root=root)
        return path
