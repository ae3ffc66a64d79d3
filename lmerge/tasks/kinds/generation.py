"""``generation``: a causal (or seq2seq) language model writes its answer after the prompt; the
answer is decoded (greedy by default, batched, left-padded) and scored as text. Learners and
fine-tuning train on the teacher-forced cross-entropy of the reference answer, as for
``label_tokens``, so every learner works on generation tasks.

A task's ``generation`` settings (every key optional):

- ``max_new_tokens`` (32): most tokens generated per answer.
- ``stop`` (none): strings that end an answer: a row stops generating once its text holds one (or
  at EOS), and its answer is cut before the first.
- ``answer_pattern`` (none): a regular expression that picks the answer out of the generated text
  and out of the reference: its last match's first group (the whole match for a pattern without
  groups). A generated text it does not match gives an empty answer; a reference it does not match
  is kept whole. E.g. ``(-?[\\d,.]*\\d)`` scores the final number.
- ``num_beams`` (1): 1 decodes greedily; more run beam search with that many beams.

The metrics (``exact_match``, ``contains``, ``wer``; ``lmerge.metrics``) compare the answers so
found; ``exact_match`` and ``contains`` after SQuAD-style normalisation.

Batches: those of ``label_tokens`` without label words (``input_ids`` = prompt then answer,
right-padded, ``labels`` on the answer; for an encoder-decoder the prompt and ``labels`` = the
answer apart, with ``encoder_decoder: True``), plus ``prompt_ids`` [B, P] and ``prompt_mask``
[B, P] long: each prompt alone within ``max_length`` (BOS and its end kept), left-padded so that
every row's answer starts at column P (for an encoder-decoder, its ``input_ids`` and
``attention_mask``), and ``answers``: the B reference answer texts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmerge.errors import ConfigError
from lmerge.metrics import METRICS, extract_answer, get_metric
from lmerge.tasks.kinds._batches import to_device
from lmerge.tasks.kinds._language_model import keep_end
from lmerge.tasks.kinds.label_tokens import LabelTokens, collate_answers
from lmerge.tasks.kinds.registry import Batch, TaskData, register_kind

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lmerge.tasks.spec import TaskSpec


@dataclass(frozen=True)
class GenerationSettings:
    """How a task's answers are generated and read (the module docstring describes each)."""

    max_new_tokens: int = 32
    """Most tokens generated per answer."""
    stop: tuple[str, ...] = ()
    """Strings that end an answer."""
    answer_pattern: re.Pattern[str] | None = None
    """Picks the answer out of the generated text and the reference."""
    num_beams: int = 1
    """1: greedy decoding; more: beam search."""

    @classmethod
    def read(cls, values: Any, where: str) -> GenerationSettings:
        """The settings of a task spec's ``generation`` mapping; a bad key or value is one
        ConfigError starting with ``where``."""
        if values is None:
            return cls()
        names = [f.name for f in fields(cls)]
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: generation must be a mapping of {', '.join(names)}; got {values!r}")
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{where}: generation.{unknown[0]}: unknown key (valid: {', '.join(names)})")
        for key in ("max_new_tokens", "num_beams"):
            value = values.get(key, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}: generation.{key} must be a positive integer, got {value!r}")
        stop = values.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"{where}: generation.stop must be a list of non-empty strings, got {stop!r}")
        pattern = values.get("answer_pattern")
        if pattern is not None:
            try:
                pattern = re.compile(pattern)
            except (re.error, TypeError) as exc:
                message = f"generation.answer_pattern {pattern!r} is not a regular expression ({exc})"
                raise ConfigError(f"{where}: {message}") from None
        return cls(
            max_new_tokens=values.get("max_new_tokens", cls.max_new_tokens),
            stop=tuple(stop),
            answer_pattern=pattern,
            num_beams=values.get("num_beams", cls.num_beams),
        )


@register_kind
class Generation(LabelTokens):
    """A language model generates its answer after the prompt; scored by comparing texts, trained
    on the teacher-forced answer (the model, loss and predictions of ``label_tokens``)."""

    name = "generation"
    generates = True
    default_metric = "exact_match"

    def check(self, spec: TaskSpec, where: str) -> None:
        if spec.label_names:
            raise ConfigError(
                f"{where}: generation answers are free text, so label_names do not apply "
                "(kind label_tokens scores label words)"
            )
        if not METRICS[spec.metric].on_text:
            text_metrics = ", ".join(name for name, metric in METRICS.items() if metric.on_text)
            raise ConfigError(f"{where}: metric {spec.metric!r} does not score generated text; use {text_metrics}")
        GenerationSettings.read(spec.generation, where)

    def score(
        self, model: nn.Module, batches: Iterable[Batch], task: TaskSpec, data: TaskData, device: torch.device
    ) -> tuple[float, int]:
        settings = GenerationSettings.read(task.generation, f"task {task.name}")
        measure = get_metric(task.metric).build(0).to(device)
        count = 0
        for batch in batches:
            batch = to_device(batch, device)
            texts = generate_answers(model, batch, data.tokenizer, settings, data.pad_id())
            predictions, references = read_answers(texts, batch["answers"], settings.answer_pattern)
            measure.update(predictions, references)
            count += len(texts)
        return float(measure.compute()), count

    def encode(self, data: TaskData, texts: list[str], labels: list[int | str]) -> list[dict[str, Any]]:
        """``label_tokens``' examples (prompt and answer for the teacher-forced loss), each with its
        ``generation_prompt``: the prompt alone within ``max_length`` (causal models)."""
        examples = super().encode(data, texts, labels)
        if data.encoder_decoder:
            return examples  # the encoder's input is the prompt alone already
        spec, tokenizer = data.spec, data.tokenizer
        prompts = [spec.prompt.replace("{text}", t) for t in texts] if spec.prompt else texts
        for example, prompt in zip(examples, tokenizer(prompts)["input_ids"]):
            example["generation_prompt"] = keep_end(prompt, spec.max_length, tokenizer.bos_token_id)
        return examples

    def collator(self, data: TaskData) -> Callable[[list[dict[str, Any]]], Batch]:
        return partial(collate_generation, pad_id=data.pad_id(), encoder_decoder=data.encoder_decoder)


def collate_generation(examples: list[dict[str, Any]], pad_id: int, encoder_decoder: bool) -> Batch:
    """A generation batch (module docstring) from encoded examples."""
    batch = collate_answers(examples, pad_id, None, encoder_decoder)
    if encoder_decoder:
        batch["prompt_ids"], batch["prompt_mask"] = batch["input_ids"], batch["attention_mask"]
    else:
        prompts = [e["generation_prompt"] for e in examples]
        width = max(map(len, prompts))
        batch["prompt_ids"] = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        batch["prompt_mask"] = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            batch["prompt_ids"][row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            batch["prompt_mask"][row, width - len(prompt) :] = 1
    batch["answers"] = [e["label"] for e in examples]
    return batch


def end_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS (the training answers end with it) and
    the model's own end tokens (its generation config's ``eos_token_id``, one or several)."""
    model_ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(model_ends, int):
        model_ends = [model_ends]
    ends = [tokenizer.eos_token_id, *(model_ends or [])]
    return sorted({token for token in ends if token is not None})


def generate_ids(
    model: nn.Module, batch: Batch, settings: GenerationSettings, tokenizer: PreTrainedTokenizerBase, pad_id: int
) -> list[list[int]]:
    """Each row's generated tokens, up to (not including) its first end or padding token."""
    from transformers import StoppingCriteriaList

    prompts = batch["prompt_ids"]
    # An encoder-decoder's output starts with the decoder's start token; a causal LM's with the prompt.
    start = 1 if batch.get("encoder_decoder") else prompts.shape[1]
    ends = end_ids(model, tokenizer)
    criteria = StoppingCriteriaList([_StopStrings(settings.stop, tokenizer, start)] if settings.stop else [])
    output = model.generate(
        input_ids=prompts,
        attention_mask=batch["prompt_mask"],
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        num_beams=settings.num_beams,
        eos_token_id=ends or None,
        pad_token_id=pad_id,
        stopping_criteria=criteria,
    )
    finished = {*ends, pad_id}
    rows = []
    for row in output[:, start:].tolist():
        rows.append(row[: next((i for i, token in enumerate(row) if token in finished), len(row))])
    return rows


def generate_answers(
    model: nn.Module, batch: Batch, tokenizer: PreTrainedTokenizerBase, settings: GenerationSettings, pad_id: int
) -> list[str]:
    """Each row's generated answer text: decoded, cut before the first stop string, stripped."""
    texts = tokenizer.batch_decode(generate_ids(model, batch, settings, tokenizer, pad_id), skip_special_tokens=True)
    return [cut_at_stop(text, settings.stop).strip() for text in texts]


def cut_at_stop(text: str, stop: Iterable[str]) -> str:
    """``text`` up to its first stop string."""
    found = [text.find(s) for s in stop if s in text]
    return text[: min(found)] if found else text


def read_answers(
    generated: list[str], references: list[str], pattern: re.Pattern[str] | None
) -> tuple[list[str], list[str]]:
    """The answers that ``pattern`` picks out of the generated texts (empty where it finds none) and
    out of the references (kept whole where it finds none); both unchanged without a pattern."""
    predictions = [extract_answer(text, pattern) or "" for text in generated]
    targets = [extract_answer(text, pattern) or text for text in references]
    return predictions, targets


class _StopStrings:
    """A ``transformers`` stopping criterion: a row is done once its generated text holds a stop
    string. (``generate``'s own ``stop_strings`` needs a tokenizer whose vocabulary it can read as
    byte-level or SentencePiece pieces; decoding works with every tokenizer.)"""

    def __init__(self, stop: tuple[str, ...], tokenizer: PreTrainedTokenizerBase, start: int) -> None:
        self.stop = stop
        self.tokenizer = tokenizer
        self.start = start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
