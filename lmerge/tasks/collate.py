"""Batches: pad encoded examples into tensors.

Batch formats (right padding; ``B`` examples, ``L`` the longest in the batch):

- ``classification``: ``input_ids`` [B, L] long, ``attention_mask`` [B, L] long, ``labels`` [B]
  long (class ids).
- ``label_tokens``: ``input_ids`` [B, L] = prompt tokens then answer tokens (``" " + label``, then
  EOS when the tokenizer has one), ``attention_mask`` [B, L], ``labels`` [B, L] = -100 on the
  prompt and the padding and the answer's token ids on the answer positions (a causal LM shifts
  them itself). The prompt of row b is ``input_ids[b, :k]`` with ``k`` its first position where
  ``labels != -100``. With ``label_names`` also ``class_ids`` [B] long (the label index) and
  ``candidates`` [C, Lc] long: row c is the answer of label c (the same tokens that follow the
  prompt in ``input_ids``), right-padded with -100, the same tensor in every batch.
  For an encoder-decoder (seq2seq) base model instead: ``input_ids`` = the prompt alone,
  ``labels`` [B, La] = the answer tokens (-100 padded; the model shifts them into decoder
  inputs) and ``encoder_decoder: True``.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


class Collator:
    """Pads encoded examples into a batch (module docstring: the batch formats).

    A plain class rather than a closure, so DataLoader workers can pickle it.
    """

    def __init__(
        self, kind: str, pad_id: int, candidates: torch.Tensor | None = None, encoder_decoder: bool = False
    ) -> None:
        self.kind = kind
        self.pad_id = pad_id
        self.candidates = candidates
        self.encoder_decoder = encoder_decoder

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            ids = example["input_ids"]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.kind == "classification":
            batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
            return batch
        if self.encoder_decoder:
            # The encoder reads the prompt; the decoder's targets are the answer tokens alone.
            answer_width = max(len(e["answer_ids"]) for e in examples)
            labels = torch.full((len(examples), answer_width), IGNORE_INDEX, dtype=torch.long)
            for row, example in enumerate(examples):
                labels[row, : len(example["answer_ids"])] = torch.tensor(example["answer_ids"], dtype=torch.long)
            batch["encoder_decoder"] = True
        else:
            labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
            for row, example in enumerate(examples):
                start, end = example["prompt_length"], len(example["input_ids"])
                labels[row, start:end] = input_ids[row, start:end]
        batch["labels"] = labels
        if self.candidates is not None:
            batch["class_ids"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
            batch["candidates"] = self.candidates
        return batch
