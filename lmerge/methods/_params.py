"""Parameter checks and per-module values that the merge methods share."""

from __future__ import annotations

import math
from typing import Any

import torch
import yaml

from lmerge.errors import MethodError
from lmerge.methods.registry import ModuleContext


def module_lambda(params: dict[str, Any], ctx: ModuleContext, name: str) -> float:
    """The lambda for this module: the policy's value, else the method's own parameter ``name``."""
    return float(params[name] if ctx.lam is None else ctx.lam)


def check_equal_ranks(As: list[torch.Tensor], method: str, ctx: ModuleContext) -> None:
    """Factor averaging needs one rank: ``A_i`` of shape ``[r, in]`` for every adapter."""
    ranks = [A.shape[0] for A in As]
    if len(set(ranks)) > 1:
        raise MethodError(f"method {method!r} needs equal LoRA ranks, {ctx.key} has ranks {ranks}")


def _bad(name: str, message: str) -> MethodError:
    return MethodError(f"method_params.{name}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(params: dict[str, Any], name: str) -> float:
    """``params[name]`` as a finite float (stored back)."""
    value = params[name]
    if not _is_number(value):
        raise _bad(name, f"expected a finite number, got {value!r}")
    params[name] = float(value)
    return params[name]


def check_range(
    params: dict[str, Any], name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """``params[name]`` as a float in ``[low, high]`` (open at an end with ``low_open``/``high_open``)."""
    value = check_number(params, name)
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise _bad(name, f"must be in {interval}, got {value:g}")
    return value


def check_int(params: dict[str, Any], name: str) -> int:
    """``params[name]`` as an int; a float with an integral value is accepted."""
    value = params[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name, f"expected an integer, got {value!r}")
    params[name] = value
    return value


def check_bool(params: dict[str, Any], name: str) -> bool:
    """``params[name]``, which must be a bool (the registry casts CLI strings)."""
    value = params[name]
    if not isinstance(value, bool):
        raise _bad(name, f"expected true or false, got {value!r}")
    return value


def parse_yaml(name: str, value: Any) -> Any:
    """A string given on the command line parsed as YAML (``"[0.5, 0.5]"``); anything else as is."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise _bad(name, f"cannot parse {value!r}") from None


def number_list(name: str, value: Any, n_adapters: int) -> list[float]:
    """``value`` (a list or its YAML string) as ``n_adapters`` finite floats, one per adapter."""
    value = parse_yaml(name, value)
    if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
        raise _bad(name, f"expected a list of {n_adapters} numbers (one per adapter), got {value!r}")
    if len(value) != n_adapters:
        raise _bad(name, f"has {len(value)} values for {n_adapters} adapters: {list(value)!r}")
    return [float(v) for v in value]
