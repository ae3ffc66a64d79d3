"""Learned merge coefficients: raw parameters [groups, adapters] and their parametrizations,
and the ``weighted_delta_n`` merge spec that reproduces a learned merge."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmerge.errors import ConfigError, unknown_name


@dataclass(frozen=True)
class Parametrization:
    """How raw parameters map to coefficients: ``forward(raw)``, its ``inverse`` (to set values),
    an optional in-place ``project`` of raw after each optimizer step, and whether values may be
    negative. ``domain`` describes the valid values for error messages."""

    name: str
    forward: Callable[[Tensor], Tensor]
    inverse: Callable[[Tensor], Tensor]
    project: Callable[[Tensor], Tensor] | None
    signed: bool
    domain: str = "finite numbers"


def _identity(raw: Tensor) -> Tensor:
    return raw


def _clamp_unit(raw: Tensor) -> Tensor:
    return raw.clamp_(0.0, 1.0)


def _softmax(raw: Tensor) -> Tensor:
    return torch.softmax(raw, dim=-1)


def _log_normalized(values: Tensor) -> Tensor:
    # Normalizing first keeps raw rows at logsumexp 0, so set values are exactly what forward gives.
    return torch.log(values / values.sum(-1, keepdim=True))


PARAMETRIZATIONS: dict[str, Parametrization] = {
    # Projected gradient descent (AdaMerging): clamping in forward would zero the gradient at the bounds.
    "clamp": Parametrization("clamp", _identity, _identity, _clamp_unit, signed=False, domain="[0, 1]"),
    "sigmoid": Parametrization("sigmoid", torch.sigmoid, torch.logit, None, signed=False, domain="(0, 1)"),
    "tanh": Parametrization("tanh", torch.tanh, torch.atanh, None, signed=True, domain="(-1, 1)"),
    "softmax": Parametrization(
        "softmax", _softmax, _log_normalized, None, signed=False, domain="positive numbers (normalized over adapters)"
    ),
    "none": Parametrization("none", _identity, _identity, None, signed=True),
}

Values = float | Sequence[float] | Sequence[Sequence[float]] | Tensor


class Coefficients(nn.Module):
    """Merge coefficients for ``n_adapters`` adapters in ``groups`` groups (1: task-wise, one per
    layer: layer-wise). ``raw`` [groups, n_adapters] is the only trainable parameter; calling the
    module gives the parametrized values [groups, n_adapters]."""

    merge_method = "weighted_delta_n"
    """The merge method whose spec reproduces a merge with these coefficients."""

    def __init__(
        self,
        n_adapters: int,
        groups: int = 1,
        parametrization: str = "clamp",
        init: float | list[float] | list[list[float]] = 0.3,
        group_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            valid = list(PARAMETRIZATIONS)
            raise ConfigError("parametrization: " + unknown_name("parametrization", parametrization, valid))
        if n_adapters < 1 or groups < 1:
            raise ConfigError(f"coefficients: need at least one adapter and one group, got {n_adapters} and {groups}")
        self.parametrization = PARAMETRIZATIONS[parametrization]
        self.n_adapters = n_adapters
        self.groups = groups
        if group_names is None:
            group_names = ["all"] if groups == 1 else [str(g) for g in range(groups)]
        if len(group_names) != groups:
            raise ConfigError(f"group_names: {len(group_names)} names for {groups} groups")
        self.group_names = list(group_names)
        # Initial values must lie inside the open range: at an infinite raw value the gradient is zero.
        self.raw = nn.Parameter(self._raw_for(init, "init", allow_bounds=False).float())

    def forward(self) -> Tensor:
        """The coefficients [groups, n_adapters]."""
        return self.parametrization.forward(self.raw)

    @torch.no_grad()
    def project_(self) -> None:
        """Apply the parametrization's projection to ``raw`` (call after each optimizer step)."""
        if self.parametrization.project is not None:
            self.parametrization.project(self.raw)

    @torch.no_grad()
    def values(self) -> list[list[float]]:
        """The coefficients as nested lists [groups][n_adapters]."""
        return self().detach().cpu().tolist()

    @torch.no_grad()
    def set_values(self, values: Values) -> None:
        """Set ``raw`` so that the coefficients equal ``values`` (a number, one list per adapter, or
        [groups][n_adapters]). Bounds are allowed here (one-hot baselines) though they freeze training."""
        self.raw.copy_(self._raw_for(values, "values", allow_bounds=True))

    def _raw_for(self, values: Values, what: str, allow_bounds: bool) -> Tensor:
        target = self._matrix(values, what)
        p = self.parametrization
        raw = p.inverse(target)
        back = p.forward(raw)
        outside = bool(raw.isnan().any()) or not bool(back.isfinite().all())
        outside |= not allow_bounds and bool(raw.isinf().any())
        outside |= p.project is not None and not torch.equal(p.project(back.clone()), back)
        if outside:
            shown = values.tolist() if isinstance(values, Tensor) else values
            raise ConfigError(f"{what}: {shown!r} is outside {p.domain}, the range of the {p.name} parametrization")
        return raw

    def _matrix(self, values: Values, what: str) -> Tensor:
        shape = (self.groups, self.n_adapters)
        try:
            tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(f"{what}: expected a number or lists of numbers, got {values!r}") from None
        if tensor.dim() == 0 or (tensor.dim() == 1 and len(tensor) == self.n_adapters):
            return tensor.expand(shape).clone()
        if tuple(tensor.shape) != shape:
            raise ConfigError(
                f"{what}: expected a number, {self.n_adapters} values (one per adapter) or "
                f"{self.groups}x{self.n_adapters} values, got shape {list(tensor.shape)}"
            )
        return tensor

    def extra_repr(self) -> str:
        return f"groups={self.groups}, n_adapters={self.n_adapters}, parametrization={self.parametrization.name}"

    # ---- what the fused model, the learners and the callbacks ask of any coefficients -----------------
    def row_values(self, group: Tensor | int, adapter: Tensor, rows: Tensor) -> Tensor:
        """The coefficient of each rank row: ``group`` and ``adapter`` index each row's group and
        adapter, ``rows`` its row in the rank layout (see :meth:`row_start`; unused here)."""
        return self()[group, adapter]

    def row_start(self, key: str) -> int:
        """First row of module ``key`` in the rank layout (rank-wise coefficients only)."""
        return 0

    def penalty(self) -> Tensor | None:
        """A term added to the training loss, or None."""
        return None

    def mixing_matrix(self, row_start: int) -> Tensor | None:
        """The learned ``R x R`` rank-mixing matrix of the module whose rank rows start at ``row_start``
        (rank-wise coefficients with ``rank_mixing_lr`` only); None: no mixing."""
        return None

    def snapshot(self) -> Any:
        """Everything that sets the coefficients, to :meth:`restore` later (e.g. the best ones)."""
        return self.values()

    def restore(self, snapshot: Any) -> None:
        """Set the coefficients from a :meth:`snapshot`."""
        self.set_values(snapshot)

    def display_values(self) -> list[list[float]]:
        """[groups][n_adapters] values to show (heatmaps): the coefficients themselves."""
        return self.values()

    def rank_statistics(self) -> dict[str, dict[int, tuple[float, float]]]:
        """Group -> adapter index -> (mean, standard deviation) of its rank coefficients; empty
        for coefficients that are not rank-wise."""
        return {}

    def merge_spec(self, adapters: list[str], group_layers: list[int | None], signed: bool) -> dict[str, Any]:
        """The merge config (``adapters``, ``method``, ``method_params``) that reproduces a merge
        with these coefficients."""
        return export_merge_spec(self, adapters, group_layers, signed)


def export_merge_spec(
    coefficients: Coefficients, adapters: list[str], group_layers: list[int | None], signed: bool
) -> dict[str, Any]:
    """A ``weighted_delta_n`` merge config (``adapters``, ``method``, ``method_params``) that
    reproduces the merge with these coefficients: each layer group's values become
    ``layer_weights[layer]``; the group without a layer ("other", or the single task-wise group)
    becomes ``weights``, which otherwise holds the mean over groups (used by no module then)."""
    values = coefficients.values()
    if len(group_layers) != len(values):
        raise ConfigError(f"group_layers: {len(group_layers)} entries for {len(values)} coefficient groups")
    if len(adapters) != coefficients.n_adapters:
        raise ConfigError(f"adapters: {len(adapters)} names for {coefficients.n_adapters} coefficients per group")
    layer_weights: dict[int, list[float]] = {}
    others = []
    for row, layer in zip(values, group_layers, strict=True):
        if layer is None:
            others.append(row)
        elif layer in layer_weights:
            raise ConfigError(f"group_layers: layer {layer} has two coefficient groups; weighted_delta_n allows one")
        else:
            layer_weights[layer] = row
    if len(others) > 1:
        raise ConfigError(
            f"group_layers: {len(others)} groups have no layer; weighted_delta_n has one set of weights for them"
        )
    weights = others[0] if others else [sum(column) / len(values) for column in zip(*values, strict=True)]
    params: dict[str, Any] = {"weights": weights}
    if layer_weights:
        params["layer_weights"] = layer_weights
    params["allow_negative_coefficients"] = bool(signed or any(v < 0 for row in values for v in row))
    params["normalize_coefficients"] = False
    return {"method": "weighted_delta_n", "adapters": list(adapters), "method_params": params}
