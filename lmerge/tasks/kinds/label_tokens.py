"""``label_tokens``: a causal (or seq2seq) language model continues the prompt with the answer
tokens (``" " + label``, then EOS when the tokenizer has one).

Batches (right padding; ``B`` examples, ``L`` the longest in the batch): ``input_ids`` [B, L] =
prompt tokens then answer tokens, ``attention_mask`` [B, L], ``labels`` [B, L] = -100 on the
prompt and the padding and the answer's token ids on the answer positions (a causal LM shifts
them itself). The prompt of row b is ``input_ids[b, :k]`` with ``k`` its first position where
``labels != -100``. With ``label_names`` also ``class_ids`` [B] long (the label index) and
``candidates`` [C, Lc] long: row c is the answer of label c (the same tokens that follow the
prompt in ``input_ids``), right-padded with -100, the same tensor in every batch.
For an encoder-decoder (seq2seq) base model instead: ``input_ids`` = the prompt alone,
``labels`` [B, La] = the answer tokens (-100 padded; the model shifts them into decoder inputs)
and ``encoder_decoder: True``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmerge.errors import ConfigError
from lmerge.metrics import MetricSpec, get_metric
from lmerge.tasks.kinds._batches import IGNORE_INDEX, class_count, pad_inputs, to_device
from lmerge.tasks.kinds._language_model import (
    aligned,
    answer_ids,
    answer_log_probs,
    answer_start_logits,
    forward_logits,
    keep_end,
    token_ce,
    token_kl,
)
from lmerge.tasks.kinds.registry import Batch, Scored, TaskData, TaskKind, register_kind

if TYPE_CHECKING:
    from lmerge.tasks.spec import TaskSpec


@register_kind
class LabelTokens(TaskKind):
    """A language model answers after the prompt; scored by the label word it finds most likely,
    or by every teacher-forced answer token being its argmax."""

    name = "label_tokens"
    text_answers = True
    shared_keys = ("candidates",)

    def check(self, spec: TaskSpec, where: str) -> None:
        if spec.metric == "macro_f1" and not spec.label_names:
            raise ConfigError(f"{where}: metric 'macro_f1' on label_tokens needs label_names")

    def model_class(self, encoder_decoder: bool) -> str:
        return "AutoModelForSeq2SeqLM" if encoder_decoder else "AutoModelForCausalLM"

    def peft_task_type(self, encoder_decoder: bool) -> str:
        return "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM"

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return forward_logits(model, batch)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Token-normalized cross-entropy on the answer tokens."""
        return token_ce(logits, batch)

    def loss_terms(self, batch: Batch) -> int:
        """The answer tokens that :meth:`loss` averages over."""
        labels = batch["labels"]
        return int((aligned(labels, labels, batch)[1] != IGNORE_INDEX).sum())

    def token_keys(self, batch: Batch) -> tuple[str, ...]:
        # A causal LM's labels sit on its input tokens; an encoder-decoder's are the decoder's own.
        inputs = ("input_ids", "attention_mask")
        return inputs if batch.get("encoder_decoder") else (*inputs, "labels")

    def distillation_loss(self, logits: torch.Tensor, teacher: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``KL(teacher || model)`` over the vocabulary at each answer token (teacher-forced), mean
        over the answer tokens: the labels say only where the answer is."""
        return token_kl(logits, teacher, batch)

    def predict(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[B, C] probabilities at the end of each prompt: over the label words' first tokens when
        the task has label words, else over the whole vocabulary. Reads where the answer starts,
        never which answer it is, so it suits unlabeled objectives."""
        next_token = answer_start_logits(logits, batch).float()
        if "candidates" in batch:
            next_token = next_token[:, batch["candidates"][:, 0]]
        return next_token.softmax(-1)

    def score(
        self, model: nn.Module, batches: Iterable[Batch], task: TaskSpec, data: TaskData, device: torch.device
    ) -> Scored:
        return score_label_tokens(
            model,
            batches,
            get_metric(task.metric),
            class_count(task.label_names),
            device,
            candidates=_token_lists(data.candidates),
            decode=lambda ids: data.tokenizer.decode(ids, skip_special_tokens=True).strip(),
        )

    def label_words(self, data: TaskData) -> torch.Tensor | None:
        if not data.spec.label_names:
            return None
        answers = [answer_ids(data.tokenizer, name) for name in data.spec.label_names]
        words = torch.full((len(answers), max(map(len, answers))), IGNORE_INDEX, dtype=torch.long)
        for row, ids in enumerate(answers):
            words[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return words

    def encode(self, data: TaskData, texts: list[str], labels: list[int | str]) -> list[dict[str, Any]]:
        """Prompt ids then answer ids within ``max_length`` (``prompt_length`` marks the split);
        for an encoder-decoder the prompt ids and the ``answer_ids`` apart."""
        spec, tokenizer, candidates = data.spec, data.tokenizer, data.candidates
        prompts = [spec.prompt.replace("{text}", t) for t in texts] if spec.prompt else texts
        prompt_ids = tokenizer(prompts)["input_ids"]
        if candidates is not None:
            answers = [[i for i in candidates[label].tolist() if i != IGNORE_INDEX] for label in labels]
        else:
            answers = [answer_ids(tokenizer, str(label)) for label in labels]
        if data.encoder_decoder:
            return [
                {"input_ids": prompt[: spec.max_length], "answer_ids": answer[: spec.max_length], "label": label}
                for prompt, answer, label in zip(prompt_ids, answers, labels)
            ]
        bos = tokenizer.bos_token_id
        examples = []
        for prompt, answer, label in zip(prompt_ids, answers, labels):
            # Keep the whole answer (it is the target) and the end of the prompt.
            answer = answer[: spec.max_length - 1]
            prompt = keep_end(prompt, spec.max_length - len(answer), bos)
            examples.append({"input_ids": prompt + answer, "prompt_length": len(prompt), "label": label})
        return examples

    def collator(self, data: TaskData) -> Callable[[list[dict[str, Any]]], Batch]:
        return partial(
            collate_answers, pad_id=data.pad_id(), candidates=data.candidates, encoder_decoder=data.encoder_decoder
        )


def collate_answers(
    examples: list[dict[str, Any]], pad_id: int, candidates: torch.Tensor | None, encoder_decoder: bool
) -> Batch:
    """A label_tokens batch (module docstring) from encoded examples."""
    batch = pad_inputs(examples, pad_id)
    input_ids = batch["input_ids"]
    if encoder_decoder:
        # The encoder reads the prompt; the decoder's targets are the answer tokens alone.
        answer_width = max(len(e["answer_ids"]) for e in examples)
        labels = torch.full((len(examples), answer_width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, : len(example["answer_ids"])] = torch.tensor(example["answer_ids"], dtype=torch.long)
        batch["encoder_decoder"] = True
    else:
        labels = torch.full(input_ids.shape, IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            start, end = example["prompt_length"], len(example["input_ids"])
            labels[row, start:end] = input_ids[row, start:end]
    batch["labels"] = labels
    if candidates is not None:
        batch["class_ids"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        batch["candidates"] = candidates
    return batch


def score_label_tokens(
    model: nn.Module,
    batches: Iterable[Batch],
    metric: MetricSpec,
    n_classes: int,
    device: torch.device,
    candidates: Sequence[Sequence[int]] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> Scored:
    """Exact match of the answer tokens. With label words (``candidates``, one token list per
    class), the prediction is the label word the model finds most likely after the prompt;
    without, every teacher-forced answer token must be the model's argmax. Text metrics
    (WER) compare the decoded argmax answer with the reference answer."""
    measure = metric.build(n_classes).to(device)
    count = 0
    # Only label words make each prediction a class.
    predicted = torch.zeros(n_classes, dtype=torch.long, device=device) if candidates else None
    for batch in batches:
        batch = to_device(batch, device)
        logits = forward_logits(model, batch)
        labels = batch["labels"]
        count += len(labels)
        predicted_logits, target = aligned(logits, labels, batch)
        if metric.on_text:
            predicted = predicted_logits.argmax(-1)
            mask = target != IGNORE_INDEX
            hyps = [decode(predicted[i][mask[i]].tolist()) for i in range(len(labels))]
            refs = [decode(target[i][mask[i]].tolist()) for i in range(len(labels))]
            measure.update(hyps, refs)
        elif candidates:
            classes = _candidate_scores(model, batch, logits, candidates).argmax(-1)
            measure.update(classes, batch["class_ids"])
            predicted += torch.bincount(classes, minlength=n_classes)[:n_classes]
        else:
            mask = target != IGNORE_INDEX
            correct = ((predicted_logits.argmax(-1) == target) | ~mask).all(-1)
            # Exact match as a two-class accuracy: class 1 = the whole answer is right.
            measure.update(correct.long(), torch.ones_like(correct, dtype=torch.long))
    return Scored(float(measure.compute()), count, None if predicted is None else predicted.tolist())


def _candidate_scores(
    model: nn.Module, batch: Batch, logits: torch.Tensor, candidates: Sequence[Sequence[int]]
) -> torch.Tensor:
    """[B, n_classes] log-likelihood of each label word after each example's prompt."""
    labels = batch["labels"]
    firsts = [c[0] for c in candidates]
    if len(set(firsts)) == len(firsts) and all(len(c) == 1 for c in candidates):
        # Single-token label words: one forward pass already holds every candidate's score.
        return F.log_softmax(answer_start_logits(logits, batch).float(), -1)[:, firsts]
    scores = []
    for candidate in candidates:
        if batch.get("encoder_decoder"):
            target = torch.tensor([list(candidate)] * len(labels), device=labels.device)
            asked = {**batch, "labels": target}
        else:
            ids, mask, target = _with_answer(batch, (labels != IGNORE_INDEX).int().argmax(-1), candidate)
            asked = {"input_ids": ids, "attention_mask": mask, "labels": target}
        picked, _ = answer_log_probs(forward_logits(model, asked), target, asked)
        scores.append(picked.sum(-1))
    return torch.stack(scores, -1)


def _with_answer(
    batch: Batch, starts: torch.Tensor, answer: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each example's prompt followed by ``answer``, right-padded, with labels on the answer."""
    input_ids = batch["input_ids"]
    answer_tensor = torch.tensor(list(answer), device=input_ids.device)
    width = int(starts.max()) + len(answer)
    ids = torch.zeros(len(input_ids), width, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids)
    target = torch.full_like(ids, IGNORE_INDEX)
    for i, start in enumerate(starts.tolist()):
        ids[i, :start] = input_ids[i, :start]
        ids[i, start : start + len(answer)] = answer_tensor
        mask[i, : start + len(answer)] = 1
        target[i, start : start + len(answer)] = answer_tensor
    return ids, mask, target


def _token_lists(candidates: torch.Tensor | None) -> list[list[int]] | None:
    """The -100-padded [C, Lc] label-word tensor as one token list per class."""
    if candidates is None:
        return None
    return [[token for token in row.tolist() if token != IGNORE_INDEX] for row in candidates]
