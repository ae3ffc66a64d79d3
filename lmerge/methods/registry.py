"""The merge method registry: the only dispatch from a method name to its code.

Four kinds of method, each with its own function signature:

- ``factors``: ``fn(As, Bs, params, ctx) -> (A, B)`` combines LoRA factors; every ``B``
  arrives with its adapter's scaling folded in and the result has scaling 1.
- ``linear``: ``fn(n, params, ctx) -> list[float]`` is only a coefficient rule; the shared
  combiner applies ``sum_i c_i * delta_i`` exactly as a LoRA of rank ``sum_i r_i``.
- ``dense``: ``fn(deltas, params, ctx) -> delta`` works elementwise on the task vectors of
  one module. ``deltas`` is a ``_task_vectors.TaskVectors``: its ``merge`` hands blocks of rows
  ``[n, rows, in]``, built from the LoRA factors, to the method's per-block step and assembles
  the ``[out, in]`` result, so that the dense ``[n, out, in]`` stack never exists. Every dense
  method also takes ``space`` (added here): ``weight`` runs it on the task vectors, ``core`` on
  their cores in core space (``_lowrank.CoreSpace``), which makes the result an exact LoRA.
- ``low_rank``: ``fn(As, Bs, params, ctx) -> (A, B)`` computes its result exactly from the
  factors (every ``B`` with its scaling folded in), through thin QR/SVD of the factor stacks and
  small cores (``_lowrank``), never an ``[out, in]`` matrix: a LoRA ``B @ A`` with scaling 1 and
  rank at most ``sum_i r_i``, saved as it is.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lmerge.errors import MethodError, did_you_mean, unknown_name


class Kind(str, enum.Enum):
    """Where a method works: on LoRA factors, linearly on task vectors, densely, or exactly in low rank."""

    FACTORS = "factors"
    LINEAR = "linear"
    DENSE = "dense"
    LOW_RANK = "low_rank"


class Space(str, enum.Enum):
    """Where a dense method runs: on the task vectors or on their cores in core space.

    In core space the method is lmerge's own, as in weight space; Core Space merging's code
    (github.com/apanariello4/core-space-merging, ``task_merger.py``) differs in four choices:
    its DARE sums the dropped cores where ``dare`` takes their mean (``lambda`` times n gives
    their sum), its DARE-TIES also trims to a top-k after the drop where ``dare_ties`` is PEFT's
    (drop, elect signs, disjoint mean), and its top-k (TIES's ``topk_values_mask``) keeps the
    ``int(k% * numel) + 1`` largest magnitudes and every entry tied with the last, where ``ties``
    keeps exactly ``int(k% * numel)`` (PEFT's count); and its bases are every singular vector of
    the factor stacks, where lmerge's leave out those of zero singular value (a stack short of
    rank, such as one holding an adapter twice) and the factors of an adapter whose update is zero
    (such as PEFT's initial ``B = 0``). Either would add directions no task vector has, which
    change a top-k's count or turn the cores: TIES of an adapter with itself, or with a zero one,
    would not be its own TIES as in weight space.
    """

    WEIGHT = "weight"
    CORE = "core"


KIND_DEFAULTS: dict[Kind, dict[str, Any]] = {Kind.DENSE: {"space": Space.WEIGHT.value}}
"""Parameters every method of a kind takes, with their defaults (the engine reads them)."""


@dataclass(frozen=True)
class ModuleContext:
    """What a method may know about the module it merges."""

    key: str
    """Module path, e.g. ``bert.encoder.layer.3.attention.self.query``."""
    layer: int | None
    """Layer index parsed from the key, ``None`` for keys outside numbered layers."""
    lam: float | None
    """The lambda policy's value for this module (``None`` when the method has no lambda)."""


Validator = Callable[[dict[str, Any], int], None]


@dataclass(frozen=True)
class MergeMethod:
    """One registered merge method and everything the runner needs to know about it."""

    name: str
    kind: Kind
    fn: Callable[..., Any]
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    validate: Validator | None = None
    min_adapters: int = 1
    max_adapters: int | None = None
    saveable: bool = True
    lambda_param: str | None = None
    """The parameter a lambda policy governs per module (``lambda``, ``scale``), if any."""

    @property
    def param_names(self) -> list[str]:
        return sorted(set(self.defaults) | set(self.required))

    def normalize_params(self, params: Mapping[str, Any] | None, n_adapters: int) -> dict[str, Any]:
        """Check the adapter count, fill defaults, cast CLI strings and validate."""
        if n_adapters < self.min_adapters:
            raise MethodError(f"method {self.name!r} needs at least {self.min_adapters} adapters, got {n_adapters}")
        if self.max_adapters is not None and n_adapters > self.max_adapters:
            raise MethodError(f"method {self.name!r} takes at most {self.max_adapters} adapters, got {n_adapters}")
        given = dict(params or {})
        unknown = sorted(set(given) - set(self.param_names))
        if unknown:
            valid = ", ".join(self.param_names) or "none"
            hint = did_you_mean(unknown[0], self.param_names)
            raise MethodError(
                f"method_params.{unknown[0]}: not a parameter of method {self.name!r}{hint} (valid: {valid})"
            )
        missing = [name for name in self.required if name not in given]
        if missing:
            raise MethodError(f"method_params.{missing[0]} is required by method {self.name!r}")
        out = dict(self.defaults)
        for name, value in given.items():
            out[name] = _cast_like(name, value, self.defaults.get(name))
        if "space" in KIND_DEFAULTS.get(self.kind, {}):
            _check_space(out)
        if self.validate is not None:
            self.validate(out, n_adapters)
        return out


METHODS: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    kind: Kind,
    defaults: Mapping[str, Any] | None = None,
    required: tuple[str, ...] = (),
    validate: Validator | None = None,
    min_adapters: int = 1,
    max_adapters: int | None = None,
    saveable: bool = True,
    lambda_param: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as merge method ``name``; the docstring's first line
    becomes its description. Mistakes fail at import time."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in METHODS:
            raise RuntimeError(f"merge method {name!r} is registered twice")
        if not fn.__doc__:
            raise RuntimeError(f"merge method {name!r} needs a docstring (it is the CLI help)")
        if lambda_param is not None and lambda_param not in (defaults or {}):
            raise RuntimeError(f"merge method {name!r}: lambda_param {lambda_param!r} needs a default")
        METHODS[name] = MergeMethod(
            name=name,
            kind=kind,
            fn=fn,
            description=" ".join(fn.__doc__.split("\n\n")[0].split()),  # its first paragraph, on one line
            defaults={**(defaults or {}), **KIND_DEFAULTS.get(kind, {})},
            required=tuple(required),
            validate=validate,
            min_adapters=min_adapters,
            max_adapters=max_adapters,
            saveable=saveable,
            lambda_param=lambda_param,
        )
        return fn

    return decorate


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; an unknown name lists the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(unknown_name("method", name, list(METHODS))) from None


def _check_space(params: dict[str, Any]) -> None:
    valid = [space.value for space in Space]
    if params["space"] not in valid:
        raise MethodError(f"method_params.space: must be one of {', '.join(valid)}, got {params['space']!r}")


def _cast_like(name: str, value: Any, default: Any) -> Any:
    """Cast a value given on the command line (a string) to the type of its default."""
    if not isinstance(value, str) or default is None or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise MethodError(f"method_params.{name}: expected {type(default).__name__}, got {value!r}") from None
    return value
