"""Task heads: a copy of the model's own head that a PEFT adapter saved (``modules_to_save``), and
the pooled head that lmerge saves beside a plain LoRA adapter of the encoder.

A pooled head is two files in a directory (an adapter's, or a merged bundle's ``heads/``):

- ``<stem>.json``: ``{"format": "lmerge.task_head", "pooling": "mean", "label_names": [...],
  "in_features": 384, "num_labels": 2}``
- ``<stem>.safetensors``: ``weight`` [num_labels, in_features] and ``bias`` [num_labels].

``logits = weight @ pool(last hidden state) + bias``, where ``mean`` pools the attention-masked
mean over the tokens and ``last`` the last token that is not padding. An adapter directory keeps
its head as ``task_head.json`` + ``task_head.safetensors``; PEFT ignores both files.

The base model says which pooling it was trained with when it is a sentence-transformers model
(``modules.json`` naming a ``Pooling`` module, whose ``config.json`` sets the mode).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from lmerge.adapters.lora import PEFT_PREFIX
from lmerge.errors import AdapterError, ConfigError
from lmerge.outputs import write_bytes_atomic, write_json_atomic

ADAPTER_HEAD = "task_head"
"""File stem of the pooled head inside an adapter directory."""
HEAD_MODULE = "task_head"
"""Attribute of the base model that holds the pooled head while a task runs."""
HEAD_FORMAT = "lmerge.task_head"
POOLED = ("mean", "last")
"""Poolings a pooled head computes itself; ``cls`` is the model's own classification class."""
# sentence-transformers Pooling config flags and the pooling each means here.
_SENTENCE_TRANSFORMERS_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_max_tokens": None,
    "pooling_mode_mean_sqrt_len_tokens": None,
    "pooling_mode_weightedmean_tokens": None,
}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, H] from the last hidden state ``hidden`` [B, L, H]: the attention-masked mean over the
    tokens (``mean``), or the last token whose mask is set (``last``, whichever side is padded).
    Computed in at least float32."""
    hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=hidden.dtype)
    last = (mask * positions).argmax(1)
    return hidden[torch.arange(len(hidden), device=hidden.device), last]


class PooledHead(nn.Module):
    """A linear classifier over the pooled last hidden state."""

    def __init__(self, pooling: str, in_features: int, num_labels: int) -> None:
        super().__init__()
        if pooling not in POOLED:
            raise ConfigError(f"pooling: {pooling!r} is not one of {', '.join(POOLED)}")
        self.pooling = pooling
        self.linear = nn.Linear(in_features, num_labels)

    @classmethod
    def from_state(cls, pooling: str, state: dict[str, torch.Tensor]) -> PooledHead:
        """A frozen head holding ``state`` (``weight``, ``bias``)."""
        num_labels, in_features = state["weight"].shape
        head = cls(pooling, in_features, num_labels)
        head.linear.weight = nn.Parameter(state["weight"].clone(), requires_grad=False)
        head.linear.bias = nn.Parameter(state["bias"].clone(), requires_grad=False)
        return head.requires_grad_(False)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(pool(hidden, attention_mask, self.pooling).to(self.linear.weight.dtype))

    def extra_repr(self) -> str:
        return f"pooling={self.pooling}"


@dataclass
class HeadFile:
    """A pooled head as read from its two files."""

    pooling: str
    label_names: list[str] | None
    state: dict[str, torch.Tensor]
    """``weight`` [num_labels, in_features] and ``bias`` [num_labels], float."""
    where: Path
    """The JSON file, for messages."""


def head_paths(directory: str | Path, stem: str = ADAPTER_HEAD) -> tuple[Path, Path]:
    """``(<stem>.json, <stem>.safetensors)`` in ``directory``."""
    directory = Path(directory)
    return directory / f"{stem}.json", directory / f"{stem}.safetensors"


def has_head(directory: str | Path, stem: str = ADAPTER_HEAD) -> bool:
    """Whether ``directory`` holds a pooled head's JSON file under ``stem``."""
    return head_paths(directory, stem)[0].is_file()


def head_pooling(directory: str | Path, stem: str = ADAPTER_HEAD) -> str:
    """The pooling a pooled head's JSON file records (checked)."""
    config_path, _ = head_paths(directory, stem)
    return _pooling_of(_read_head_config(config_path), config_path)


def read_head(directory: str | Path, stem: str = ADAPTER_HEAD) -> HeadFile:
    """The pooled head saved in ``directory`` under ``stem``, checked: known pooling, tensors of
    matching shapes, finite values, label names that fit."""
    config_path, weights_path = head_paths(directory, stem)
    config = _read_head_config(config_path)
    pooling = _pooling_of(config, config_path)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or set(tensors) != {"weight", "bias"}:
        raise AdapterError(f"{weights_path}: a task head holds exactly 'weight' and 'bias', got {sorted(tensors)}")
    if weight.dim() != 2 or bias.shape != (weight.shape[0],):
        raise AdapterError(
            f"{weights_path}: weight {list(weight.shape)} and bias {list(bias.shape)} are not a linear layer"
        )
    if not (weight.is_floating_point() and torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise AdapterError(f"{weights_path}: the head's tensors must be finite floating-point numbers")
    labels = config.get("label_names")
    if labels is not None and (
        not isinstance(labels, list) or not all(isinstance(n, str) for n in labels) or len(labels) != len(weight)
    ):
        raise AdapterError(f"{config_path}: label_names must be {len(weight)} names (one per row of the head)")
    for key, expected in (("num_labels", weight.shape[0]), ("in_features", weight.shape[1])):
        if key in config and config[key] != expected:
            raise AdapterError(f"{config_path}: {key} is {config[key]!r} but the head's weight says {expected}")
    return HeadFile(pooling, labels, {"weight": weight.float(), "bias": bias.float()}, config_path)


def write_head(
    directory: str | Path,
    pooling: str,
    label_names: list[str] | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stem: str = ADAPTER_HEAD,
    *,
    root: str | Path,
) -> list[Path]:
    """Save a pooled head in ``directory`` (inside ``root``) under ``stem``, each file atomically
    and the weights first, so a JSON file always has its weights; returns the two paths."""
    config_path, weights_path = head_paths(directory, stem)
    tensors = {"weight": weight.detach().float().cpu().contiguous(), "bias": bias.detach().float().cpu().contiguous()}
    write_bytes_atomic(weights_path, save(tensors, metadata={"format": "pt"}), root=root)
    config = {
        "format": HEAD_FORMAT,
        "pooling": pooling,
        "label_names": list(label_names) if label_names else None,
        "in_features": int(weight.shape[1]),
        "num_labels": int(weight.shape[0]),
    }
    write_json_atomic(config_path, config, root=root)
    return [config_path, weights_path]


def model_pooling(base_model: str | Path) -> str:
    """The pooling the base model was trained with: a sentence-transformers model's (``modules.json``
    naming a ``Pooling`` module), else ``cls`` (the model's own classification class)."""
    root = Path(base_model)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return "cls"
    modules = _read_json(modules_file, ConfigError)
    entries = [m for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    pooling_entry = next((m for m in entries if str(m.get("type", "")).endswith("Pooling")), None)
    if pooling_entry is None:
        return "cls"
    config_file = root / str(pooling_entry.get("path", "")) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{modules_file}: names a Pooling module, but {config_file} is missing")
    config = _read_json(config_file, ConfigError)
    if not isinstance(config, dict):
        raise ConfigError(f"{config_file}: expected a JSON object")
    modes = [flag for flag in _SENTENCE_TRANSFORMERS_MODES if config.get(flag) is True]
    found = [_SENTENCE_TRANSFORMERS_MODES[flag] for flag in modes]
    if len(found) != 1 or found[0] is None:
        shown = ", ".join(modes) or "none"
        raise ConfigError(
            f"{config_file}: sentence-transformers pooling {shown} is not supported; "
            "set the task's pooling (mean, cls or last) in the catalog"
        )
    return found[0]


# ---- the model's own head, saved by PEFT (modules_to_save) ----------------------------------------
def head_module_name(head_state: dict[str, torch.Tensor]) -> str:
    """The model path of the head a PEFT adapter saved (``base_model.model.classifier.weight`` -> ``classifier``)."""
    names = {key.removeprefix(PEFT_PREFIX).rpartition(".")[0] for key in head_state}
    return min(names, key=len)


def copy_model_head(model: nn.Module, head_state: dict[str, torch.Tensor]) -> tuple[str, nn.Module]:
    """A frozen copy of ``model``'s head module holding ``head_state`` (which may have its own
    number of classes); returns ``(module path, head)``."""
    name = head_module_name(head_state)
    try:
        head = copy.deepcopy(model.get_submodule(name))
    except AttributeError:
        raise ConfigError(f"task head {name!r} saved by the adapter is not a module of the base model") from None
    for key, tensor in head_state.items():
        path = key.removeprefix(PEFT_PREFIX).removeprefix(f"{name}.")
        owner_path, _, param = path.rpartition(".")
        owner = head.get_submodule(owner_path) if owner_path else head
        setattr(owner, param, nn.Parameter(tensor.clone(), requires_grad=False))
        if isinstance(owner, nn.Linear) and param == "weight":
            owner.out_features, owner.in_features = tensor.shape
    return name, head.requires_grad_(False)


def _read_head_config(path: Path) -> dict:
    config = _read_json(path, AdapterError)
    if not isinstance(config, dict) or config.get("format") != HEAD_FORMAT:
        raise AdapterError(f'{path}: not an lmerge task head (expected "format": "{HEAD_FORMAT}")')
    return config


def _pooling_of(config: dict, path: Path) -> str:
    pooling = config.get("pooling")
    if pooling not in POOLED:
        raise AdapterError(f"{path}: pooling {pooling!r} is not one of {', '.join(POOLED)}")
    return pooling


def _read_json(path: Path, error: type[Exception]) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not readable JSON ({exc})") from None
