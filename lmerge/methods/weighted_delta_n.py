"""``weighted_delta_n``: a weighted sum of n task vectors, with optional per-layer weights."""

from __future__ import annotations

from typing import Any

from lmerge.errors import MethodError
from lmerge.methods._params import check_bool, number_list, parse_yaml
from lmerge.methods.registry import Kind, ModuleContext, register


def _check_weights(name: str, weights: list[float], params: dict[str, Any]) -> None:
    if not params["allow_negative_coefficients"] and any(w < 0 for w in weights):
        raise MethodError(
            f"method_params.{name}: negative weight in {weights!r} "
            "(set method_params.allow_negative_coefficients to allow it)"
        )
    if params["normalize_coefficients"] and sum(weights) == 0:
        raise MethodError(f"method_params.{name}: weights {weights!r} sum to 0 and cannot be normalized")


def _layer_index(key: Any) -> int:
    # YAML gives int keys, the command line and JSON give strings; int(2.5) would truncate.
    if isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
        return int(key)
    raise ValueError(key)


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_bool(params, "allow_negative_coefficients")
    check_bool(params, "normalize_coefficients")
    params["weights"] = number_list("weights", params["weights"], n_adapters)
    _check_weights("weights", params["weights"], params)
    layer_weights = parse_yaml("layer_weights", params["layer_weights"])
    if layer_weights is None:
        return
    if not isinstance(layer_weights, dict):
        raise MethodError(
            f"method_params.layer_weights: expected a mapping {{layer index: weights}}, got {layer_weights!r}"
        )
    parsed: dict[int, list[float]] = {}
    for key, weights in layer_weights.items():
        try:
            layer = _layer_index(key)
        except ValueError:
            raise MethodError(f"method_params.layer_weights: {key!r} is not a layer index") from None
        name = f"layer_weights.{layer}"
        parsed[layer] = number_list(name, weights, n_adapters)
        _check_weights(name, parsed[layer], params)
    params["layer_weights"] = parsed


@register(
    "weighted_delta_n",
    kind=Kind.LINEAR,
    defaults={"layer_weights": None, "allow_negative_coefficients": False, "normalize_coefficients": False},
    required=("weights",),
    validate=_validate,
)
def weighted_delta_n(n: int, params: dict[str, Any], ctx: ModuleContext) -> list[float]:
    """Weighted sum of n task vectors (c_i = weights_i), optionally per layer and normalized."""
    weights = (params["layer_weights"] or {}).get(ctx.layer, params["weights"])
    if params["normalize_coefficients"]:
        total = sum(weights)
        return [w / total for w in weights]
    return list(weights)
