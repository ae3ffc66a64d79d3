"""Load the base model for a task kind, and install a task's head in it."""

from __future__ import annotations

import os
import pickle

import torch
from torch import nn

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


def apply_head(model: nn.Module, kind: TaskKind, head_state: dict[str, torch.Tensor]) -> None:
    """Install the task head ``head_state`` of a task of ``kind`` in ``model`` (on the model's device)."""
    name, head = kind.build_head(model, head_state)
    model.set_submodule(name, head.to(next(model.parameters()).device))
