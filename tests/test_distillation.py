"""Distillation targets: each task's merged predictions fitted to its own adapter's (SuperMerge and
regret smooth-max ``targets: adapters``, AdaMerging's ``distillation_weight``), for classification
heads and for answer tokens, reading no label."""

from __future__ import annotations

import pytest
import torch
from test_learners import data_for, fit

from lmerge.errors import ConfigError
from lmerge.learn import AdaMerging, RegretSmoothMax, SuperMerge
from lmerge.tasks.kinds._batches import IGNORE_INDEX, class_kl
from lmerge.tasks.kinds._language_model import token_kl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_class_kl_is_the_mean_kl_of_the_teacher_from_the_model():
    torch.manual_seed(0)
    logits, teacher = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    p, q = teacher.softmax(-1), logits.softmax(-1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(class_kl(logits, teacher), by_hand.float())
    assert float(class_kl(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_token_kl_counts_only_the_positions_that_predict_answer_tokens():
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:5] = torch.tensor([4, 7])  # a causal LM's positions 2, 3 predict them
    labels[1, 5] = 2  # position 4
    batch = {"labels": labels}
    rows = [(0, 2), (0, 3), (1, 4)]
    by_hand = class_kl(torch.stack([logits[r] for r in rows]), torch.stack([teacher[r] for r in rows]))
    torch.testing.assert_close(token_kl(logits, teacher, batch), by_hand)
    changed = logits.clone()
    changed[0, :2], changed[1, 5] = 100.0, -100.0  # prompt positions and the last one predict nothing
    torch.testing.assert_close(token_kl(changed, teacher, batch), by_hand)
    labels[0, 3], labels[1, 5] = 0, 1  # other answers at the same places: the labels' values are not read
    torch.testing.assert_close(token_kl(logits, teacher, batch), by_hand)


@pytest.mark.parametrize("tasks_of", [("alpha", "beta"), ("yes", "maybe")], ids=["bert_heads", "llama_tokens"])
def test_distilling_reads_no_label_and_is_zero_at_the_tasks_own_adapter(tasks, tasks_of):
    own, other = tasks_of
    learner = SuperMerge(str(tasks), [own, other], [own], targets="adapters")
    learner.configure_model()
    data = data_for(tasks, "train", names=(own,))
    data.setup("fit")
    batch = next(iter(data.train_dataloader().iterables[own]))
    objective = lambda b: float(learner.task_objective(own, learner.task_logits(own, b), b))  # noqa: E731
    merged = objective(batch)
    assert merged > 1e-4
    labels = batch["labels"]
    wrong = {**batch, "labels": torch.where(labels == IGNORE_INDEX, labels, (labels + 1) % 3)}
    assert objective(wrong) == pytest.approx(merged, rel=1e-6)
    with learner.fixed_coefficients(learner.one_hot(0)):
        assert objective(batch) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("tasks_of", [("alpha", "beta"), ("yes", "maybe")], ids=["bert_heads", "llama_tokens"])
def test_distilled_regret_is_the_kl_over_the_own_adapters_prediction_entropy(tasks, tmp_path, tasks_of):
    """``targets: adapters``: regret_t = KL(own || merged) / (H_t + eps), H_t the own adapter's mean
    prediction entropy over the baseline batches; no label read, zero at the own adapter."""
    own, other = tasks_of
    learner = RegretSmoothMax(str(tasks), [own, other], [own], targets="adapters", baseline_batches=2, lr=0.05)
    data = data_for(tasks, "train", names=(own,))
    fit(learner, data, 1, tmp_path)
    batches = iter(data.tasks[own].dataloader("train", batch_size=data.fit_batch_size))  # the baseline's
    entropies = []
    with torch.no_grad(), learner.own_adapter_alone(own):
        for batch in (next(batches), next(batches)):
            probs = learner.kind.predict(learner.task_logits(own, batch), batch)
            entropies.append(float(-(probs * probs.log()).sum(-1).mean()))
    assert learner.baselines[own] == pytest.approx(sum(entropies) / 2, rel=1e-4) and learner.baselines[own] > 0
    learner.own_logits_seen.clear()
    with torch.no_grad():
        logits = learner.task_logits(own, batch)
        kl = float(learner.kind.distillation_loss(logits, learner.own_adapter_logits(own, batch), batch))
        objective = lambda b: float(learner.task_objective(own, learner.task_logits(own, b), b))  # noqa: E731
        assert kl > 1e-5 and objective(batch) == pytest.approx(kl / (learner.baselines[own] + 1e-6), rel=1e-4)
        labels = batch["labels"]
        wrong = {**batch, "labels": torch.where(labels == IGNORE_INDEX, labels, (labels + 1) % 3)}
        assert objective(wrong) == pytest.approx(objective(batch), rel=1e-6)
        with learner.fixed_coefficients(learner.one_hot(0)):
            assert objective(batch) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ConfigError, match=r"model.targets: labels or adapters, got 'soft'"):
        RegretSmoothMax(str(tasks), [own, other], targets="soft")


def test_labels_of_the_test_split_are_refused_but_its_inputs_may_be_distilled(tasks, tmp_path):
    with pytest.raises(ConfigError, match=r"data.fit_split test: SuperMerge with targets labels"):
        fit(SuperMerge(str(tasks), ["alpha", "beta"]), data_for(tasks, "test"), 1, tmp_path)
    learner = SuperMerge(str(tasks), ["alpha", "beta"], targets="adapters", lr=0.1)
    before = learner.coefficients.values()
    fit(learner, data_for(tasks, "test"), 3, tmp_path)
    assert learner.coefficients.values() != before


def test_test_split_answers_in_language_model_inputs_are_refused(tasks, tmp_path):
    learner = SuperMerge(str(tasks), ["yes", "maybe"], targets="adapters")
    with pytest.raises(ConfigError, match=r"data.fit_split test: label_tokens batches hold the answers"):
        fit(learner, data_for(tasks, "test", names=("yes", "maybe")), 1, tmp_path)


@pytest.mark.parametrize("tasks_of", [("alpha", "beta"), ("yes", "maybe")], ids=["bert_heads", "llama_tokens"])
def test_adamerging_distillation_term_is_the_kl_from_the_own_adapters_predictions(tasks, tasks_of):
    own, other = tasks_of
    plain = AdaMerging(str(tasks), [own, other], [own])
    anchored = AdaMerging(str(tasks), [own, other], [own], distillation_weight=2.0)
    data = data_for(tasks, "test", names=(own,))
    data.setup("fit")
    batch = next(iter(data.train_dataloader().iterables[own]))
    objectives = []
    for learner in (plain, anchored):
        learner.configure_model()
        logits = learner.task_logits(own, batch)
        objectives.append(float(learner.task_objective(own, logits, batch)))
        with learner.fixed_coefficients(learner.one_hot(0)):
            alone = learner.task_logits(own, batch)
    merged, target = plain.kind.predict(logits, batch), plain.kind.predict(alone, batch)
    by_hand = (target * (target.log() - merged.log())).sum(-1).mean()
    assert objectives[1] - objectives[0] == pytest.approx(2.0 * float(by_hand), rel=1e-4)
    assert float(by_hand) > 1e-5
    with pytest.raises(ConfigError, match=r"model.distillation_weight: must be >= 0, got -1"):
        AdaMerging(str(tasks), [own, other], distillation_weight=-1)


def test_the_own_adapters_logits_are_kept_per_example_and_reused_in_any_batch(tasks):
    learner = SuperMerge(str(tasks), ["alpha", "beta"], ["alpha"], targets="adapters")
    learner.configure_model()
    data = data_for(tasks, "train", names=("alpha",))
    data.setup("fit")
    batches = iter(data.train_dataloader().iterables["alpha"])
    first, second = next(batches), next(batches)
    passes = []
    learner.model.register_forward_hook(lambda *_: passes.append(1))
    learner.own_adapter_logits("alpha", first)
    learner.own_adapter_logits("alpha", second)
    assert len(passes) == 2
    # The same examples in another batch: reversed, with more padding, one of them twice.
    rows = [len(first["input_ids"]) - 1 - i for i in range(len(first["input_ids"]))] + [0]
    width = first["input_ids"].shape[1] + 3
    again = {
        "input_ids": torch.nn.functional.pad(first["input_ids"][rows], (0, 3), value=0),
        "attention_mask": torch.nn.functional.pad(first["attention_mask"][rows], (0, 3), value=0),
        "labels": first["labels"][rows],
    }
    assert again["input_ids"].shape[1] == width
    kept = learner.own_adapter_logits("alpha", again)
    assert len(passes) == 2 and kept.shape[0] == len(rows)
    learner.own_logits_seen.clear()
    torch.testing.assert_close(kept, learner.own_adapter_logits("alpha", again), atol=1e-5, rtol=1e-4)
    assert len(passes) == 3
    # One example not seen before: the batch takes a pass.
    learner.own_logits_seen["alpha"].pop(next(iter(learner.own_logits_seen["alpha"])))
    learner.own_adapter_logits("alpha", again)
    assert len(passes) == 4
