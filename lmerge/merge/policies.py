"""Lambda policies: the value of a method's lambda-like parameter for each module.

``lambda_policy`` in a config is ``scalar`` (one value everywhere, the method's own
``lambda``/``scale`` unless ``value`` is given) or ``per_layer``::

    lambda_policy: {type: per_layer, default: 0.5, overrides: {0: 0.2, 5: 0.8}}

where ``overrides`` maps layer indices (parsed from module keys) to values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from lmerge.errors import ConfigError, did_you_mean, unknown_name
from lmerge.methods.registry import MergeMethod

LambdaFn = Callable[[int | None], float | None]


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool):  # YAML's true is no lambda, though float(True) is 1.0
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: must be finite, got {value!r}")
    return number


def _scalar(spec: Mapping[str, Any], base: float) -> LambdaFn:
    value = _number("lambda_policy.value", spec["value"]) if spec.get("value") is not None else base
    return lambda layer: value


def _per_layer(spec: Mapping[str, Any], base: float) -> LambdaFn:
    default = _number("lambda_policy.default", spec["default"]) if spec.get("default") is not None else base
    raw = spec.get("overrides") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError("lambda_policy.overrides: expected a mapping {layer index: value}")
    overrides = {
        _layer_index(layer): _number(f"lambda_policy.overrides.{layer}", value) for layer, value in raw.items()
    }
    return lambda layer: overrides.get(layer, default) if layer is not None else default


def _layer_index(key: Any) -> int:
    """A layer index given as a key of ``overrides``: a whole number, or its digits (never a
    float or a bool, which ``int`` would truncate or take as 0 and 1)."""
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    raise ConfigError(f"lambda_policy.overrides: {key!r} is not a layer index")


POLICIES: dict[str, Callable[[Mapping[str, Any], float], LambdaFn]] = {
    "scalar": _scalar,
    "per_layer": _per_layer,
}
_KEYS = {"scalar": {"type", "value"}, "per_layer": {"type", "default", "overrides"}}


def policy_spec(spec: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Normalize ``scalar`` / ``{type: per_layer, ...}`` to a mapping with ``type``."""
    if spec is None:
        return {"type": "scalar"}
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"lambda_policy: expected a name or a mapping, got {spec!r}")
    spec = dict(spec)
    spec.setdefault("type", "scalar")
    if spec["type"] not in POLICIES:
        raise ConfigError("lambda_policy.type: " + unknown_name("lambda policy", spec["type"], list(POLICIES)))
    extra = sorted(set(spec) - _KEYS[spec["type"]])
    if extra:
        valid = ", ".join(sorted(_KEYS[spec["type"]]))
        hint = did_you_mean(extra[0], _KEYS[spec["type"]])
        raise ConfigError(f"lambda_policy.{extra[0]}: not a key of the {spec['type']} policy{hint} (valid: {valid})")
    return spec


def build_policy(
    spec: str | Mapping[str, Any] | None,
    method: MergeMethod,
    params: Mapping[str, Any],
    given: Mapping[str, Any] | None = None,
) -> LambdaFn:
    """Per-layer lambda function for ``method`` with its normalized ``params``; ``given``, the
    parameters the config set: a policy that sets every layer's lambda itself (a scalar
    ``value``, a per-layer ``default``) refuses another lambda given there, which it would ignore
    (a sweep over it would sweep nothing)."""
    spec = policy_spec(spec)
    if method.lambda_param is None:
        if set(spec) != {"type"} or spec["type"] != "scalar":
            raise ConfigError(f"lambda_policy: method {method.name!r} has no lambda parameter to set")
        return lambda layer: None
    own = "value" if spec["type"] == "scalar" else "default"
    given = given or {}
    if (
        spec.get(own) is not None
        and method.lambda_param in given
        and _number(f"method_params.{method.lambda_param}", given[method.lambda_param])
        != _number(f"lambda_policy.{own}", spec[own])
    ):
        raise ConfigError(
            f"lambda_policy.{own}: sets {method.lambda_param} for every layer, so method_params."
            f"{method.lambda_param} ({given[method.lambda_param]!r}) would be ignored; give one of them"
        )
    base = _number(f"method_params.{method.lambda_param}", params[method.lambda_param])
    return POLICIES[spec["type"]](spec, base)


def overridden_layers(spec: str | Mapping[str, Any] | None) -> set[int]:
    """Layer indices a policy names explicitly (to check they exist in the adapters)."""
    spec = policy_spec(spec)
    overrides = spec.get("overrides") or {}
    return {_layer_index(layer) for layer in overrides} if isinstance(overrides, Mapping) else set()
