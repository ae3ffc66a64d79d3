"""Pre-merge transforms: per-adapter, per-module scale factors applied to task vectors
before the method runs.

A transform only rescales whole task vectors, so it keeps LoRA factors exact: it returns a
factor for each ``(adapter index, module key)`` and the runner folds it into ``B``.
Config form: ``transforms: [{name: layer_l2_normalize, params: {target_norm: 1.0}}]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lmerge.errors import ConfigError, did_you_mean, unknown_name
from lmerge.layers import layer_index

Norms = Mapping[tuple[int, str], float]
Scales = dict[tuple[int, str], float]


@dataclass(frozen=True)
class Transform:
    """A registered transform; ``fn(norms, n_adapters, keys, params) -> scales``."""

    name: str
    fn: Callable[[Norms, int, list[str], dict[str, Any]], Scales]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_norms: bool = False
    """Whether ``fn`` reads the Frobenius norms of the task vectors."""


def _identity(norms: Norms, n: int, keys: list[str], params: dict[str, Any]) -> Scales:
    return {}


def _layer_l2_normalize(norms: Norms, n: int, keys: list[str], params: dict[str, Any]) -> Scales:
    """Scale each adapter's task vector, layer by layer, to Frobenius norm ``target_norm``.
    Modules outside numbered layers are normalized one by one, or left alone."""
    groups: dict[object, list[str]] = {}
    for key in keys:
        layer = layer_index(key)
        if layer is None and not params["include_non_layer_keys"]:
            continue
        groups.setdefault(layer if layer is not None else key, []).append(key)
    scales: Scales = {}
    for members in groups.values():
        for i in range(n):
            norm = sum(norms[(i, key)] ** 2 for key in members) ** 0.5
            factor = params["target_norm"] / max(norm, params["eps"])
            scales.update({(i, key): factor for key in members})
    return scales


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform("identity", _identity),
    "layer_l2_normalize": Transform(
        "layer_l2_normalize",
        _layer_l2_normalize,
        defaults={"target_norm": 1.0, "eps": 1e-12, "include_non_layer_keys": True},
        needs_norms=True,
    ),
}


def parse_transforms(specs: list[Any] | None) -> list[tuple[Transform, dict[str, Any]]]:
    """Normalize the config's ``transforms`` list to ``(transform, params)`` pairs."""
    parsed = []
    for position, spec in enumerate(specs or []):
        where = f"transforms[{position}]"
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigError(f"{where}: expected a name or {{name: ..., params: {{...}}}}")
        extra = sorted(set(spec) - {"name", "params"})
        if extra:
            raise ConfigError(
                f"{where}.{extra[0]}: unknown key{did_you_mean(extra[0], ['name', 'params'])} (valid: name, params)"
            )
        if spec["name"] not in TRANSFORMS:
            raise ConfigError(f"{where}.name: " + unknown_name("transform", spec["name"], list(TRANSFORMS)))
        transform = TRANSFORMS[spec["name"]]
        parsed.append((transform, _params(transform, dict(spec.get("params") or {}), where)))
    return parsed


def _params(transform: Transform, given: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(given) - set(transform.defaults))
    if unknown:
        valid = ", ".join(transform.defaults) or "none"
        hint = did_you_mean(unknown[0], transform.defaults)
        raise ConfigError(f"{where}.params.{unknown[0]}: not a parameter of {transform.name}{hint} (valid: {valid})")
    params = dict(transform.defaults)
    for name, value in given.items():
        default = transform.defaults[name]
        try:
            if isinstance(default, bool):
                if isinstance(value, str):
                    value = {"true": True, "false": False}[value.strip().lower()]
                elif not isinstance(value, bool):
                    raise ValueError
            else:
                value = float(value)
                if not value > 0 or value == float("inf"):
                    raise ValueError
        except (ValueError, KeyError, TypeError):
            kind = "true or false" if isinstance(default, bool) else "a positive finite number"
            raise ConfigError(f"{where}.params.{name}: expected {kind}, got {value!r}") from None
        params[name] = value
    return params
