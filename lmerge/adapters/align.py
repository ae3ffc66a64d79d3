"""Check that adapters belong together and choose the module keys to merge."""

from __future__ import annotations

from pathlib import Path

from lmerge.adapters.base_layout import layout_for
from lmerge.adapters.lora import LoraAdapter
from lmerge.errors import AdapterError, ConfigError

MERGE_MODES = ("common", "strict")


def check_compatible(adapters: list[LoraAdapter]) -> None:
    """Refuse adapters of different base models, or of mixed weight layouts."""
    bases = {}
    for adapter in adapters:
        if adapter.base_model:
            bases.setdefault(_normalize_base(adapter.base_model), adapter)
    if len(bases) > 1:
        first, second = list(bases.values())[:2]
        raise AdapterError(
            f"adapters {first.name!r} and {second.name!r} come from different base models "
            f"({first.base_model!r} vs {second.base_model!r})"
        )
    revisions = {adapter.revision: adapter for adapter in adapters if adapter.revision}
    if len(revisions) > 1:
        first, second = list(revisions.values())[:2]
        raise AdapterError(
            f"adapters {first.name!r} and {second.name!r} come from different revisions of the base model "
            f"({first.revision!r} vs {second.revision!r})"
        )
    if len({adapter.fan_in_fan_out for adapter in adapters}) > 1:
        raise AdapterError("adapters disagree on fan_in_fan_out; they were made for different model layouts")
    _check_heads(adapters)


def check_base(adapters: list[LoraAdapter], base_model: str | None = None) -> str | None:
    """Check every adapter against ``base_model`` (the config's ``save.base_model``) or, without
    it, against the base of an adapter whose base was found (so adapters that name none are
    checked too). Where no base model can be found, returns a one-line note saying so: shapes
    are then only checked between the adapters."""
    sources = ([base_model] if base_model else []) + [a.base_model for a in adapters if a.unchecked_reason is None]
    reference = adapters[0]
    reasons = []
    for source in dict.fromkeys(sources):
        layout = layout_for(source, reference.task_type, reference.config.get("auto_mapping"), reference.revision)
        if isinstance(layout, str):
            reasons.append(layout)
            continue
        for adapter in adapters:
            adapter.check_against(layout)
        return None
    reason = (reasons or [reference.unchecked_reason])[0]
    return f"adapter shapes were checked between the adapters only, not against the base model: {reason}"


def align_keys(adapters: list[LoraAdapter], merge_mode: str) -> tuple[list[str], dict[str, list[str]]]:
    """The module keys to merge and, per adapter, the keys left out (``common`` mode).

    ``common`` keeps the keys every adapter has; ``strict`` fails on any difference.
    Either way, a key whose input/output features differ between adapters is an error.
    """
    if merge_mode not in MERGE_MODES:
        raise ConfigError(f"merge_mode: {merge_mode!r} is not one of {', '.join(MERGE_MODES)}")
    common = set(adapters[0].module_keys).intersection(*(a.module_keys for a in adapters[1:]))
    dropped = {a.name: [k for k in a.module_keys if k not in common] for a in adapters}
    dropped = {name: keys for name, keys in dropped.items() if keys}
    if dropped and merge_mode == "strict":
        name, keys = next(iter(dropped.items()))
        shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        raise AdapterError(f"merge_mode strict: adapter {name!r} has modules the others lack: {shown}")
    if not common:
        raise AdapterError("the adapters share no LoRA module; there is nothing to merge")
    keys = [k for k in adapters[0].module_keys if k in common]
    for key in keys:
        reference = adapters[0].shapes[key]
        for other in adapters[1:]:
            shape = other.shapes[key]
            if (shape.in_features, shape.out_features) != (reference.in_features, reference.out_features):
                raise AdapterError(
                    f"module {key}: shape mismatch, {adapters[0].name!r} is "
                    f"[{reference.out_features}x{reference.in_features}] but {other.name!r} is "
                    f"[{shape.out_features}x{shape.in_features}]"
                )
    return keys, dropped


def _normalize_base(name: str) -> str:
    path = Path(name)
    return str(path.resolve()) if path.exists() else name.rstrip("/")


def _check_heads(adapters: list[LoraAdapter]) -> None:
    """Task heads saved under the same name must agree in every dimension but the first (each
    task's number of labels): a head made for another hidden size is refused, naming it."""
    seen: dict[str, tuple[LoraAdapter, list[int]]] = {}
    for adapter in adapters:
        for tensor, shape in adapter.head_shapes.items():
            first, first_shape = seen.setdefault(tensor, (adapter, shape))
            if len(first_shape) != len(shape) or first_shape[1:] != shape[1:]:
                raise AdapterError(
                    f"{adapter.weights_file}: head tensor {tensor} has shape {shape}, "
                    f"but adapter {first.name!r} has {first_shape}: they were made for different base models"
                )
