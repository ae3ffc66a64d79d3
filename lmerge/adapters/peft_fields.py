"""Every field of PEFT's ``LoraConfig`` and what lmerge does with it: supported (read and
checked), ignored (it changes training only, never what the saved factors mean), or refused
(the saved factors are not a plain ``scaling * B @ A`` update of the original base weights).

A field missing from this table (a newer PEFT's) is refused when it is set, so no future LoRA
variant is merged as a plain LoRA by accident. ``tests/test_peft_fields.py`` checks that the
table covers every field of the installed PEFT.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmerge.errors import AdapterError

PEFT_VERSION = "0.21.2"
"""The PEFT release whose ``LoraConfig`` this table was audited against."""


class Decision(enum.Enum):
    """What lmerge does with a field: reads and checks it, ignores it, or refuses it when set."""

    SUPPORTED = "supported"
    IGNORED = "ignored"
    REFUSED = "refused"


Check = Callable[[str, Any], "str | None"]
"""A field's check: ``(name, value) -> the problem with it``, or None when the value is fine."""


@dataclass(frozen=True)
class FieldRule:
    """What lmerge does with one field (``note``: why, in a phrase the README can show) and the
    check its value must pass (types, finite numbers; for refused fields: being off)."""

    decision: Decision
    note: str
    check: Check


def _off(value: Any) -> bool:
    """Whether ``value`` of a field lmerge does not know is off: null, false, or empty."""
    return value is None or value is False or (isinstance(value, str | list | dict) and not value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _optional(kind: type | tuple[type, ...], text: str) -> Check:
    def check(name: str, value: Any) -> str | None:
        return None if value is None or isinstance(value, kind) else f"{name}: expected {text}, got {value!r}"

    return check


def _flag(name: str, value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else f"{name}: expected true or false, got {value!r}"


def _rank(name: str, value: Any) -> str | None:
    return None if _positive_int(value) else f"{name}: expected a positive integer, got {value!r}"


def _alpha(name: str, value: Any) -> str | None:
    return None if _number(value) else f"{name}: expected a finite number, got {value!r}"


def _pattern(value_ok: Callable[[Any], bool], wanted: str) -> Check:
    def check(name: str, value: Any) -> str | None:
        if not isinstance(value, dict):  # null too: PEFT looks patterns up in it
            return f"{name}: expected a mapping {{module pattern: {wanted}}}, got {value!r}"
        for pattern, item in value.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except (re.error, TypeError) as exc:
                return f"{name}: {pattern!r} is not a valid regular expression ({exc})"
            if not value_ok(item):
                return f"{name}.{pattern}: expected {wanted}, got {item!r}"
        return None

    return check


def _names(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return None
    return f"{name}: expected a name, a list of names or null, got {value!r}"


def _layers(name: str, value: Any) -> str | None:
    if value is None or _index(value) or (isinstance(value, list) and all(_index(v) for v in value)):
        return None
    return f"{name}: expected a layer index, a list of them or null, got {value!r}"


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _dropout(name: str, value: Any) -> str | None:
    return None if _number(value) and 0 <= value <= 1 else f"{name}: expected a probability in [0, 1], got {value!r}"


def _head_names(name: str, value: Any) -> str | None:
    if value is None or (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        return None
    return f"{name}: expected a list of module names, got {value!r}"


# PEFT's TaskType values: PEFT refuses to load any other.
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def _task_type(name: str, value: Any) -> str | None:
    if value is None or value in _TASK_TYPES:
        return None
    return f"{name}: {value!r} is not a PEFT task type ({', '.join(_TASK_TYPES)})"


def _peft_type(name: str, value: Any) -> str | None:
    return None if value == "LORA" else f"peft_type {value!r} is not LORA; only LoRA adapters merge"


def _bias(name: str, value: Any) -> str | None:
    if value == "none":
        return None
    if value in ("all", "lora_only"):
        return f"bias={value!r} trains biases outside LoRA; only bias='none' merges"
    return f"{name}: expected 'none', 'all' or 'lora_only', got {value!r}"


# init_lora_weights values (besides true and false) after which the factors are a plain update
# of the untouched base.
_PLAIN_INITS = {"gaussian", "orthogonal", "eva", "mica"}
_CONVERT = "convert it first with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)"
_BASE_CHANGING_INITS = {
    "pissa": f"PiSSA moved the principal components out of the base weights; {_CONVERT}",
    "olora": f"OLoRA moved a QR factor out of the base weights; {_CONVERT}",
    "corda": f"CorDA moved components out of the base weights; {_CONVERT}",
    "lora_ga": f"LoRA-GA subtracted its initial update from the base weights; {_CONVERT}",
    "loftq": "LoftQ fit the factors to a quantized base, not the original weights",
}


def _init(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or (isinstance(value, str) and value in _PLAIN_INITS):
        return None
    family = value.split("_niter_")[0] if isinstance(value, str) else None
    if family in _BASE_CHANGING_INITS:
        return f"init_lora_weights is {value!r}: {_BASE_CHANGING_INITS[family]}"
    return f"init_lora_weights: {value!r} is not an initialization lmerge knows"


def _refuse(reason: str, flag: bool = False) -> Check:
    """Refuse the field unless it is off: null (or false, for a ``flag``). PEFT switches a
    variant on for any other value, an empty mapping included (its default settings)."""

    def check(name: str, value: Any) -> str | None:
        if value is None or (flag and value is False):
            return None
        return f"{name} is {'true' if value is True else f'set ({_short(value)})'}: {reason}"

    return check


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


SUPPORTED, IGNORED, REFUSED = Decision.SUPPORTED, Decision.IGNORED, Decision.REFUSED
_TENSORS = "the saved tensors say which modules hold LoRA"
_TRAINING = "changes training only"

FIELDS: dict[str, FieldRule] = {
    # PeftConfig's own fields
    "peft_type": FieldRule(SUPPORTED, "must be LORA", _peft_type),
    "task_type": FieldRule(SUPPORTED, "picks the base model class and its task head", _task_type),
    "auto_mapping": FieldRule(
        SUPPORTED, "names the base model class when task_type is null", _optional(dict, "a mapping")
    ),
    "peft_version": FieldRule(IGNORED, "informational", _optional(str, "a string or null")),
    "base_model_name_or_path": FieldRule(
        SUPPORTED, "adapters must share it; shapes are checked against it", _optional(str, "a string or null")
    ),
    "revision": FieldRule(SUPPORTED, "adapters must share it", _optional(str, "a string or null")),
    "inference_mode": FieldRule(IGNORED, _TRAINING, _flag),
    # LoraConfig
    "r": FieldRule(SUPPORTED, "every factor's rank must equal it (or rank_pattern's)", _rank),
    "target_modules": FieldRule(IGNORED, _TENSORS, _names),
    "exclude_modules": FieldRule(IGNORED, _TENSORS, _names),
    "lora_alpha": FieldRule(SUPPORTED, "scaling alpha / r; a finite number", _alpha),
    "lora_dropout": FieldRule(IGNORED, _TRAINING, _dropout),
    "fan_in_fan_out": FieldRule(SUPPORTED, "GPT-2 Conv1D layers; must match the base layer type", _flag),
    "bias": FieldRule(SUPPORTED, "only 'none' (trained biases are not part of B A)", _bias),
    "use_rslora": FieldRule(SUPPORTED, "scaling alpha / sqrt(r)", _flag),
    "modules_to_save": FieldRule(SUPPORTED, "task heads travel with the merge, never merged", _head_names),
    "init_lora_weights": FieldRule(
        SUPPORTED,
        "true/false/gaussian/orthogonal/eva/mica merge; pissa/olora/corda/lora_ga/loftq are refused "
        "(the base was changed: convert with PEFT first)",
        _init,
    ),
    "layers_to_transform": FieldRule(IGNORED, _TENSORS, _layers),
    "layers_pattern": FieldRule(IGNORED, _TENSORS, _names),
    "rank_pattern": FieldRule(
        SUPPORTED, "per-module ranks (PEFT's regex match)", _pattern(_positive_int, "a positive rank")
    ),
    "alpha_pattern": FieldRule(
        SUPPORTED, "per-module alphas (PEFT's regex match)", _pattern(_number, "a finite alpha")
    ),
    "megatron_config": FieldRule(REFUSED, "Megatron tensor-parallel layers", _refuse("Megatron tensor-parallel LoRA")),
    "megatron_core": FieldRule(IGNORED, "used with megatron_config only", _optional(str, "a string or null")),
    "trainable_token_indices": FieldRule(
        REFUSED, "trainable tokens", _refuse("trainable tokens change embedding rows outside LoRA")
    ),
    "loftq_config": FieldRule(
        IGNORED, "used with init_lora_weights loftq only (refused)", _optional(dict, "a mapping")
    ),
    "eva_config": FieldRule(IGNORED, "initialization only", _optional(dict, "a mapping")),
    "corda_config": FieldRule(
        IGNORED, "used with init_lora_weights corda only (refused)", _optional(dict, "a mapping")
    ),
    "lora_ga_config": FieldRule(
        IGNORED, "used with init_lora_weights lora_ga only (refused)", _optional(dict, "a mapping")
    ),
    "use_dora": FieldRule(
        REFUSED, "DoRA", _refuse("DoRA's magnitude vectors make the update more than B A", flag=True)
    ),
    "velora_config": FieldRule(
        SUPPORTED,
        "VeLoRA changes the training backward pass only; its buffers are skipped",
        _optional(dict, "a mapping"),
    ),
    "alora_invocation_tokens": FieldRule(
        REFUSED, "aLoRA", _refuse("aLoRA applies B A only after its invocation tokens, so it cannot be merged")
    ),
    "use_qalora": FieldRule(
        REFUSED, "QA-LoRA", _refuse("QA-LoRA's A acts on pooled inputs of a quantized base", flag=True)
    ),
    "qalora_group_size": FieldRule(IGNORED, "used with use_qalora only (refused)", _optional(int, "an integer")),
    "monteclora_config": FieldRule(REFUSED, "MonteCLoRA", _refuse("MonteCLoRA samples its factors")),
    "layer_replication": FieldRule(
        REFUSED, "layer replication", _refuse("the adapter was trained on a model with replicated layers")
    ),
    "runtime_config": FieldRule(IGNORED, "not saved by PEFT", _optional(dict, "a mapping")),
    "lora_bias": FieldRule(REFUSED, "a bias on lora_B", _refuse("lora_B's bias is an update outside B A", flag=True)),
    "target_parameters": FieldRule(
        REFUSED, "LoRA on raw parameters (MoE experts)", _refuse("LoRA on raw parameters is not a linear-layer LoRA")
    ),
    "use_bdlora": FieldRule(REFUSED, "block-diagonal LoRA", _refuse("block-diagonal factors are not stored as B A")),
    "arrow_config": FieldRule(REFUSED, "Arrow routing", _refuse("Arrow routes between adapters per token")),
    "kasa_config": FieldRule(REFUSED, "KaSA", _refuse("KaSA puts learned singular values between A and B")),
    "ensure_weight_tying": FieldRule(
        IGNORED, "tying of targeted layers; the saved tensors are checked as usual", _flag
    ),
}


def check_peft_config(config: dict[str, Any], where: Path) -> None:
    """Refuse ``config`` (an ``adapter_config.json`` read as a dict) with one line naming
    ``where`` and the first field that lmerge cannot merge correctly."""
    if config.get("peft_type") != "LORA":  # first: another PEFT type has other fields
        raise AdapterError(f"{where}: {_peft_type('peft_type', config.get('peft_type'))}")
    if "lora_alpha" not in config:
        raise AdapterError(f"{where}: missing key 'lora_alpha'")
    for name, value in config.items():
        rule = FIELDS.get(name)
        if rule is None:
            if not _off(value):
                raise AdapterError(
                    f"{where}: {name} is set ({_short(value)}) but is not a LoraConfig field of PEFT "
                    f"{PEFT_VERSION}; lmerge cannot tell what it does to the factors"
                )
            continue
        problem = rule.check(name, value)
        if problem:
            raise AdapterError(f"{where}: {problem}")
