"""The layer shapes of an adapter's base model, read from its ``config.json`` alone: the model is
built on the ``meta`` device, so no weight is read or allocated. Adapters are checked against it
at load: every LoRA module key must name a linear layer of the base with the factors' input and
output features, and every saved task-head tensor must fit the base's head.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmerge.errors import AdapterError

PEFT_PREFIX = "base_model.model."
# PEFT task types and the transformers class PEFT wraps for each: module keys are paths in it.
_TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


class FactorShape(Protocol):
    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LinearShape:
    """A linear layer of the base: features in and out, and whether it stores its weight
    ``[in, out]`` (transformers' ``Conv1D``, GPT-2's layers: PEFT's ``fan_in_fan_out``)."""

    in_features: int
    out_features: int
    conv1d: bool


@dataclass(frozen=True)
class BaseLayout:
    """Module and parameter shapes of one base model, as PEFT saw them when it made the adapter."""

    name: str
    prefix: str
    modules: dict[str, str]
    linear: dict[str, LinearShape]
    params: dict[str, tuple[int, ...]]
    num_labels: int | None

    def find(self, key: str, table: Mapping[str, Any]) -> str | None:
        """``key`` as ``table`` spells it: as is, or with the backbone's prefix (``bert.``) removed
        or added, for adapters made on the bare backbone or on a model with a task head."""
        for candidate in (key, key.removeprefix(f"{self.prefix}."), f"{self.prefix}.{key}"):
            if candidate in table:
                return candidate
        return None


def layout_for(
    base: str | None, task_type: str | None, auto_mapping: Any = None, revision: str | None = None
) -> BaseLayout | str:
    """The layout of ``base``, or why it cannot be had (a phrase for a note): it must be a local
    directory or a name in the local Hugging Face cache, with a config transformers can build."""
    if not base:
        return "the adapter names no base model (base_model_name_or_path)"
    stamp = _config_stamp(base)
    auto_class = auto_mapping.get("base_model_class") if isinstance(auto_mapping, dict) else None
    return _cached_layout(base, task_type, auto_class if isinstance(auto_class, str) else None, revision, stamp)


def check_adapter(
    layout: BaseLayout,
    shapes: Mapping[str, FactorShape],
    head_shapes: Mapping[str, list[int]],
    fan_in_fan_out: bool,
    weights_file: Path,
    config_file: Path,
) -> None:
    """Refuse, naming the module or head, an adapter whose factors or heads do not fit ``layout``."""
    for key, shape in shapes.items():
        found = layout.find(key, layout.modules)
        if found is None:
            raise AdapterError(f"{weights_file}: module {key}: the base model {layout.name} has no such module")
        linear = layout.linear.get(found)
        if linear is None:
            raise AdapterError(
                f"{weights_file}: module {key}: the base model's {layout.modules[found]} is not a linear layer"
            )
        if (shape.in_features, shape.out_features) != (linear.in_features, linear.out_features):
            raise AdapterError(
                f"{weights_file}: module {key}: shape mismatch with the base model, lora_A is "
                f"[{shape.rank}, {shape.in_features}] and lora_B "
                f"[{shape.out_features}, {shape.rank}], but the base layer maps {linear.in_features} "
                f"features to {linear.out_features}"
            )
        if linear.conv1d != fan_in_fan_out:
            kind = "a Conv1D (weight stored [in, out])" if linear.conv1d else "an nn.Linear"
            raise AdapterError(f"{config_file}: fan_in_fan_out is {str(fan_in_fan_out).lower()} but {key} is {kind}")
    for tensor, saved in head_shapes.items():
        name = tensor.removeprefix(PEFT_PREFIX)
        found = layout.find(name, layout.params)
        if found is None:
            raise AdapterError(f"{weights_file}: head tensor {tensor}: the base model has no parameter {name}")
        expected = layout.params[found]
        # A head's first dimension may be the adapter's own number of labels.
        labels = len(saved) == len(expected) and saved[1:] == list(expected[1:]) and expected[0] == layout.num_labels
        if list(expected) != list(saved) and not labels:
            raise AdapterError(
                f"{weights_file}: head tensor {tensor} has shape {list(saved)}, "
                f"but the base model's {found} is {list(expected)}"
            )


def _config_stamp(base: str) -> int | None:
    """A local base's config.json modification time, so a rewritten base is read again."""
    config = Path(base) / "config.json"
    try:
        return config.stat().st_mtime_ns
    except OSError:
        return None


@functools.lru_cache(maxsize=16)
def _cached_layout(
    base: str, task_type: str | None, auto_class: str | None, revision: str | None, stamp: int | None
) -> BaseLayout | str:
    # transformers loads only when an adapter's base is checked (it is slow to import).
    import transformers
    from transformers.pytorch_utils import Conv1D

    try:
        config = transformers.AutoConfig.from_pretrained(
            base, revision=revision, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # a missing, unreadable or unknown config: no layout, say why
        reason = " ".join(str(exc).split())[:160]
        return f"base model {base!r} is not available locally ({reason})"
    candidates = [_TASK_CLASSES.get(task_type or ""), auto_class, *(config.architectures or []), "AutoModel"]
    model, failures = None, []
    for class_name in dict.fromkeys(c for c in candidates if c):
        model_class = getattr(transformers, class_name, None)
        if model_class is None:
            continue
        try:
            with torch.device("meta"):
                build = model_class.from_config if class_name.startswith("Auto") else model_class._from_config
                model = build(config)
            break
        except Exception as exc:  # whatever stops a model class from building: try the next, say why
            failures.append(f"{class_name}: {' '.join(str(exc).split())[:80]}")
    if model is None:
        return f"base model {base!r}: no model class could be built from its config ({'; '.join(failures)})"
    modules, linear = {}, {}
    for name, module in model.named_modules():
        modules[name] = type(module).__name__
        if isinstance(module, nn.Linear):
            linear[name] = LinearShape(module.in_features, module.out_features, conv1d=False)
        elif isinstance(module, Conv1D):
            fan_in, fan_out = module.weight.shape
            linear[name] = LinearShape(fan_in, fan_out, conv1d=True)
    params = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    num_labels = getattr(config, "num_labels", None)
    return BaseLayout(base, model.base_model_prefix, modules, linear, params, num_labels)
