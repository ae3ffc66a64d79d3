"""``LoraFinetune(micro_batches=k)``: each training batch as parts of examples of similar lengths,
each padded to its own longest: the cuts with the fewest padded tokens, and the batch's loss and
gradient (every kind of task: pooled and ``[CLS]`` classification, a causal LM's and an
encoder-decoder's answer tokens, generation)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from test_pooling import pooled_tasks  # noqa: F401 (a fixture)

from lmerge.data import CatalogDataModule
from lmerge.errors import ConfigError
from lmerge.tasks.kinds.registry import length_parts


def padded(lengths: list[int], groups: list[list[int]]) -> int:
    return sum(len(group) * max(lengths[i] for i in group) for group in groups)


def set_partitions(items: list[int]):
    """Every partition of ``items`` into groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first], *partition]
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]


def test_length_parts_pad_the_fewest_tokens_in_the_fewest_groups():
    rng = random.Random(0)
    for _ in range(60):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 7))]
        for parts in range(1, 5):
            groups = length_parts(lengths, parts)
            assert sorted(itertools.chain(*groups)) == list(range(len(lengths))) and len(groups) <= parts
            best = min(padded(lengths, p) for p in set_partitions(list(range(len(lengths)))) if len(p) <= parts)
            assert padded(lengths, groups) == best
            fewest = min(len(p) for p in set_partitions(list(range(len(lengths)))) if padded(lengths, p) == best)
            assert len(groups) == fewest
    assert length_parts([5, 5, 5, 5], 3) == [[0, 1, 2, 3]]  # equal lengths: no cut saves a token
    assert length_parts([3, 30, 4, 31], 2) == [[0, 2], [1, 3]]


def finetuner(catalog: Path, task: str, base: Path):
    from lmerge.learn import LoraFinetune

    seed_everything(0)
    learner = LoraFinetune(str(catalog), [task], str(base), r=2, lora_alpha=4, lora_dropout=0.0, micro_batches=3)
    learner.configure_model()
    learner.log = lambda *args, **kwargs: None  # no trainer to log to
    data = CatalogDataModule(str(catalog), [task], fit_split="train", batch_size=12, tokenizer=str(base))
    data.setup("fit")
    batch, _, _ = next(iter(data.train_dataloader()))  # a combined loader's (batch, index, loader)
    return learner, batch


def loss_and_grads(learner, batch, micro_batches: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    learner.hparams.micro_batches = micro_batches
    learner.zero_grad()
    loss = learner.training_step(batch, 0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in learner.parameters() if p.requires_grad]


def check_same_step(learner, batch, task: str) -> None:
    parts = learner.kind.split(batch[task], 3)
    widths = [part["input_ids"].shape[1] for part in parts]
    assert len(parts) > 1 and max(widths) == batch[task]["input_ids"].shape[1] and min(widths) < max(widths)
    whole, whole_grads = loss_and_grads(learner, batch, 1)
    split, split_grads = loss_and_grads(learner, batch, 3)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-5)
    assert len(whole_grads) == len(split_grads) and any(g.abs().sum() > 0 for g in whole_grads)
    for a, b in zip(split_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
@pytest.mark.parametrize("base", ["bert", "llama"])
def test_micro_batches_give_the_batchs_loss_and_gradient_for_classification(pooled_tasks, base, pooling):  # noqa: F811
    task = f"{base}_{pooling}_1"
    learner, batch = finetuner(pooled_tasks, task, pooled_tasks.parent / base)
    check_same_step(learner, batch, task)


def test_micro_batches_give_the_batchs_loss_and_gradient_for_answer_tokens(
    tasks, zoo, t5_tasks, word_llama, generation_catalog
):
    learner, batch = finetuner(tasks, "yes", zoo["llama"])  # a causal LM: labels along the tokens
    check_same_step(learner, batch, "yes")
    first = learner.kind.split(batch["yes"], 3)[0]
    assert first["labels"].shape == first["input_ids"].shape
    learner, batch = finetuner(t5_tasks, "first", t5_tasks.parent / "t5")  # the decoder's own labels
    check_same_step(learner, batch, "first")
    learner, batch = finetuner(generation_catalog, "first", word_llama["base"])
    check_same_step(learner, batch, "first")


def test_micro_batches_must_be_positive(tasks, zoo):
    from lmerge.learn import LoraFinetune

    with pytest.raises(ConfigError, match=r"^model.micro_batches: must be at least 1, got 0$"):
        LoraFinetune(str(tasks), ["alpha"], str(zoo["bert"]), micro_batches=0)
