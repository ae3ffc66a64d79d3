"""Rank-wise coefficients (``granularity: rank_wise``): one coefficient per rank direction of each
adapter in each module.

The coefficient of rank direction ``k`` of adapter ``i`` in module ``m`` is
``c[m, i, k] = a[layer(m), i] + d[m, i, k]``: the adapter's layer-wise coefficient ``a`` (the
learner's parametrization, e.g. tanh for SuperMerge) plus a free offset ``d`` that starts at 0, so
training starts from the layer-wise merge. ``rank_wise_decay`` adds ``decay * sum(d^2)`` to the
loss, an L2 pull of every rank coefficient toward its adapter's layer coefficient. With the clamp
parametrization (AdaMerging) each ``c`` is projected into [0, 1] after every step.

The fused model already scales every rank row by its own ``c_rep``, so rank-wise costs one gather
and one add over the rank rows per forward. The export is an exact LoRA
``B' = [c_1 s_1 B_1 ... c_n s_n B_n]``, ``A' = [A_1; ...; A_n]`` (``c_i`` a vector over adapter
``i``'s ranks), written as a ``weighted_rank`` merge spec.

With ``mixing`` (the learners' ``rank_mixing_lr``) each module also learns an ``R x R`` matrix
``N``, from 0 and unconstrained, that mixes its rank directions: the update is
``B_s (diag(c) + N) A_cat`` with ``B_s = [s_1 B_1 ... s_n B_n]``, still an exact LoRA of rank ``R``
(``B' = B_s (diag(c) + N)``); the merge spec carries ``N`` as ``rank_mixing``. Measured on the
demo, it lowers the distilled SuperMerge's validation loss from 0.286 to 0.253 in the same time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmerge.errors import ConfigError
from lmerge.learn.coefficients import Coefficients


class RankCoefficients(Coefficients):
    """Layer-wise coefficients ``raw`` [groups, n_adapters] plus ``offsets`` [rows], one per rank
    row of every module in ``module_ranks`` (key -> each adapter's rank), in key order."""

    merge_method = "weighted_rank"

    def __init__(
        self,
        n_adapters: int,
        groups: int,
        parametrization: str,
        init: float | list[float] | list[list[float]],
        group_names: list[str],
        module_ranks: dict[str, list[int]],
        module_groups: dict[str, int],
        decay: float = 0.0,
        mixing: bool = False,
    ) -> None:
        super().__init__(n_adapters, groups, parametrization, init, group_names)
        if not decay >= 0:
            raise ConfigError(f"model.rank_wise_decay: must be >= 0, got {decay}")
        self.decay = float(decay)
        self.module_ranks = {key: list(ranks) for key, ranks in module_ranks.items()}
        self.starts: dict[str, int] = {}
        row_group, row_adapter = [], []
        for key, ranks in self.module_ranks.items():
            if len(ranks) != n_adapters:
                raise ConfigError(f"module {key}: {len(ranks)} ranks for {n_adapters} adapters")
            self.starts[key] = len(row_group)
            for adapter, rank in enumerate(ranks):
                row_group += [module_groups[key]] * rank
                row_adapter += [adapter] * rank
        self.offsets = nn.Parameter(torch.zeros(len(row_group)))
        self.mixing = (
            nn.ParameterList([nn.Parameter(torch.zeros(sum(r), sum(r))) for r in self.module_ranks.values()])
            if mixing
            else None
        )
        self._mixing_slot = {start: slot for slot, start in enumerate(self.starts.values())}
        self.register_buffer("row_group", torch.tensor(row_group, dtype=torch.long), persistent=False)
        self.register_buffer("row_adapter", torch.tensor(row_adapter, dtype=torch.long), persistent=False)

    def row_values(self, group: Tensor | int, adapter: Tensor, rows: Tensor) -> Tensor:
        return self()[group, adapter] + self.offsets[rows]

    def row_start(self, key: str) -> int:
        if key not in self.starts:
            raise ConfigError(f"module {key}: not one of the modules the rank-wise coefficients were made for")
        return self.starts[key]

    def rank_values(self) -> Tensor:
        """[rows]: every rank row's coefficient, modules in key order, adapters in order within each."""
        return self()[self.row_group, self.row_adapter] + self.offsets

    def mixing_matrix(self, row_start: int) -> Tensor | None:
        return None if self.mixing is None else self.mixing[self._mixing_slot[row_start]]

    def penalty(self) -> Tensor | None:
        if not self.decay:
            return None
        squares = self.offsets.square().sum()
        if self.mixing is not None:
            squares = squares + sum(matrix.square().sum() for matrix in self.mixing)
        return self.decay * squares

    @torch.no_grad()
    def project_(self) -> None:
        super().project_()
        project = self.parametrization.project
        if project is not None:
            # Each rank coefficient (level + offset) is projected as the level itself is.
            level = self()[self.row_group, self.row_adapter]
            self.offsets.copy_(project(level + self.offsets) - level)

    @torch.no_grad()
    def snapshot(self) -> dict[str, Any]:
        state = {"values": self.values(), "offsets": self.offsets.detach().cpu().tolist()}
        if self.mixing is not None:
            state["mixing"] = [matrix.detach().cpu().tolist() for matrix in self.mixing]
        return state

    @torch.no_grad()
    def restore(self, snapshot: Any) -> None:
        self.set_values(snapshot["values"])
        self.offsets.copy_(torch.as_tensor(snapshot["offsets"], dtype=self.offsets.dtype))
        if self.mixing is not None:
            for matrix, saved in zip(self.mixing, snapshot["mixing"], strict=True):
                matrix.copy_(torch.as_tensor(saved, dtype=matrix.dtype))

    @torch.no_grad()
    def display_values(self) -> list[list[float]]:
        """[groups][n_adapters]: the mean of each adapter's rank coefficients in the group's modules."""
        return self._group_statistics()[0].tolist()

    @torch.no_grad()
    def rank_statistics(self) -> dict[str, dict[int, tuple[float, float]]]:
        mean, std = self._group_statistics()
        return {
            name: {i: (float(mean[g, i]), float(std[g, i])) for i in range(self.n_adapters)}
            for g, name in enumerate(self.group_names)
        }

    def _group_statistics(self) -> tuple[Tensor, Tensor]:
        """Mean and (population) standard deviation [groups, n_adapters] of the rank coefficients."""
        values = self.rank_values().detach().double()
        cell = self.row_group * self.n_adapters + self.row_adapter
        size = self.groups * self.n_adapters
        count = torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, cell, torch.ones_like(values))
        total = torch.zeros_like(count).index_add_(0, cell, values)
        mean = total / count.clamp_min(1)
        spread = torch.zeros_like(count).index_add_(0, cell, (values - mean[cell]).square())
        std = (spread / count.clamp_min(1)).sqrt()
        return mean.view(self.groups, -1).cpu(), std.view(self.groups, -1).cpu()

    @torch.no_grad()
    def merge_spec(self, adapters: list[str], group_layers: list[int | None], signed: bool) -> dict[str, Any]:
        """A ``weighted_rank`` merge config: ``rank_weights`` maps each module to one list per adapter
        of its rank coefficients."""
        if len(adapters) != self.n_adapters:
            raise ConfigError(f"adapters: {len(adapters)} names for {self.n_adapters} coefficients per group")
        values = self.rank_values().detach().cpu().tolist()
        table: dict[str, list[list[float]]] = {}
        for key, ranks in self.module_ranks.items():
            row = self.starts[key]
            table[key] = []
            for rank in ranks:
                table[key].append(values[row : row + rank])
                row += rank
        negative = any(v < 0 for v in values)
        params = {"rank_weights": table, "allow_negative_coefficients": bool(signed or negative)}
        if self.mixing is not None:
            matrices = [matrix.detach().cpu().tolist() for matrix in self.mixing]
            params["rank_mixing"] = dict(zip(self.module_ranks, matrices, strict=True))
        return {"method": self.merge_method, "adapters": list(adapters), "method_params": params}

    def extra_repr(self) -> str:
        mixing = self.mixing is not None
        return f"{super().extra_repr()}, rank_rows={len(self.offsets)}, decay={self.decay}, mixing={mixing}"
