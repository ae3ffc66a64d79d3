"""Load the base model for a task kind, and build per-task heads from adapters."""

from __future__ import annotations

import copy
import os
import pickle

import torch
from torch import nn

from lmerge.adapters.lora import PEFT_PREFIX
from lmerge.errors import ConfigError
from lmerge.tasks.kinds import TaskKind, get_kind

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The one switch for code shipped with a model: set by the user in the environment, never by a
# file lmerge reads (catalogs, configs and adapters may come from anywhere).
TRUST_REMOTE_CODE_ENV = "LMERGE_TRUST_REMOTE_CODE"


def trust_remote_code() -> bool:
    """Whether models may run the Python code they ship (``auto_map``): only when the user sets
    ``LMERGE_TRUST_REMOTE_CODE=1``."""
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "").strip().lower() in ("1", "true", "yes")


def load_model(
    path: str, kind: TaskKind | str, dtype: torch.dtype | None = torch.float32, **options: object
) -> nn.Module:
    """The base model at ``path`` in the class that task kind ``kind`` (or the kind of that name)
    needs (its own code only with ``LMERGE_TRUST_REMOTE_CODE=1``); ``options`` go to
    ``from_pretrained`` (e.g. ``num_labels``)."""
    import transformers

    kind = get_kind(kind) if isinstance(kind, str) else kind
    transformers.utils.logging.disable_progress_bar()  # its bars would bury the one-line errors
    remote = trust_remote_code()
    try:
        encoder_decoder = transformers.AutoConfig.from_pretrained(path, trust_remote_code=remote).is_encoder_decoder
        return getattr(transformers, kind.model_class(encoder_decoder)).from_pretrained(
            path, dtype=dtype or "auto", trust_remote_code=remote, **options
        )
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        # UnpicklingError: a pickled checkpoint that torch's weights-only loader refused to run.
        raise ConfigError(f"base model {path!r}: cannot be loaded ({' '.join(str(exc).split())[:200]})") from None


def head_module_name(head_state: dict[str, torch.Tensor]) -> str:
    """The model path of the head a PEFT adapter saved (``base_model.model.classifier.weight`` -> ``classifier``)."""
    names = {key.removeprefix(PEFT_PREFIX).rpartition(".")[0] for key in head_state}
    return min(names, key=len)


def build_head(model: nn.Module, head_state: dict[str, torch.Tensor]) -> tuple[str, nn.Module]:
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


def apply_head(model: nn.Module, head_state: dict[str, torch.Tensor]) -> None:
    """Install the task head ``head_state`` in ``model`` (on the model's device)."""
    name, head = build_head(model, head_state)
    model.set_submodule(name, head.to(next(model.parameters()).device))
