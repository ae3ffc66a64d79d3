"""Metrics on fixed logits, checked against values computed by hand."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lmerge.metrics import get_metric, interference_delta, normalized
from lmerge.tasks.kinds import get_kind
from lmerge.tasks.kinds.classification import score_classification
from lmerge.tasks.kinds.label_tokens import score_label_tokens


class FixedLogits(nn.Module):
    """Returns preset logits for each batch, whatever the input."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, input_ids, attention_mask):  # noqa: ANN001
        return type("Out", (), {"logits": next(self.outputs)})()


def one_hot(indices: list[int], classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(indices), classes).float()


def batch(labels) -> dict:
    labels = torch.as_tensor(labels)
    return {
        "input_ids": torch.zeros(labels.shape[0], 3, dtype=torch.long),
        "attention_mask": torch.ones(labels.shape[0], 3),
        "labels": labels,
    }


def test_accuracy_and_macro_f1_by_hand():
    predicted = [0, 1, 1, 2, 2, 2]
    gold = [0, 1, 2, 2, 2, 0]
    device = torch.device("cpu")
    model = FixedLogits([one_hot(predicted[:3], 3), one_hot(predicted[3:], 3)])
    logits = partial(get_kind("classification").logits, model)
    value, count = score_classification(logits, [batch(gold[:3]), batch(gold[3:])], get_metric("accuracy"), 3, device)
    assert abs(value - 4 / 6) < 1e-6 and count == 6
    # Per class F1: class 0: p=1, r=1/2 -> 2/3; class 1: p=1/2, r=1 -> 2/3; class 2: p=2/3, r=2/3 -> 2/3.
    logits = partial(get_kind("classification").logits, FixedLogits([one_hot(predicted, 3)]))
    value, _ = score_classification(logits, [batch(gold)], get_metric("macro_f1"), 3, device)
    assert abs(value - 2 / 3) < 1e-6


def lm_batch(rows: list[list[int]], answer_from: list[int]) -> dict:
    ids = torch.tensor(rows)
    labels = ids.clone()
    for r, start in enumerate(answer_from):
        labels[r, :start] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_exact_match_and_wer_by_hand():
    vocab = 6
    # Row 0: answer tokens [3, 4] at positions 2, 3; the model predicts them from positions 1, 2.
    # Row 1: answer [5, 4]; the model gets the first token wrong.
    data = lm_batch([[1, 2, 3, 4], [1, 2, 5, 4]], [2, 2])
    logits = torch.zeros(2, 4, vocab)
    logits[0, 1, 3] = logits[0, 2, 4] = 5.0
    logits[1, 1, 3] = logits[1, 2, 4] = 5.0
    device = torch.device("cpu")
    value, _ = score_label_tokens(FixedLogits([logits]), [data], get_metric("accuracy"), 2, device)
    assert value == 0.5
    words = {3: "red", 4: "car", 5: "blue"}
    decode = lambda ids: " ".join(words[i] for i in ids)  # noqa: E731
    value, _ = score_label_tokens(FixedLogits([logits]), [data], get_metric("wer"), 2, device, decode=decode)
    assert value == 1 / 4  # one substitution over four reference words


def test_label_words_pick_the_likeliest_single_token():
    data = lm_batch([[1, 2, 3], [1, 2, 4]], [2, 2])
    data["class_ids"] = torch.tensor([0, 0])
    logits = torch.zeros(2, 3, 6)
    logits[0, 1, 3] = 2.0  # row 0 prefers "yes" (token 3)
    logits[1, 1, 4] = 2.0  # row 1 prefers "no" (token 4)
    value, _ = score_label_tokens(
        FixedLogits([logits]), [data], get_metric("accuracy"), 2, torch.device("cpu"), candidates=[[3], [4]]
    )
    assert value == 0.5


def test_interference_delta_sign_and_normalization():
    accuracy, wer = get_metric("accuracy"), get_metric("wer")
    assert abs(interference_delta(0.7, 0.9, accuracy) + 0.2) < 1e-12
    assert abs(interference_delta(0.3, 0.2, wer) + 0.1) < 1e-12  # more errors is worse: negative
    assert normalized(0.45, 0.9, accuracy) == 0.5
    assert normalized(0.4, 0.2, wer) == 0.5
