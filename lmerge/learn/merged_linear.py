"""The merged linear layers the learners train: :class:`FusedLoRALinear` (``W x`` plus every
adapter's low-rank update, weighted by the coefficients, in two GEMMs whatever the number of
adapters, or folded into the weight for large batches), its model-wide :class:`ScaleTable`, and
the dense reference :class:`DenseMergedLinear`. :mod:`lmerge.learn.fused` attaches them to a model."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmerge.learn.coefficients import Coefficients

# The autocast dtype of each mixed precision, by Lightning's names for them.
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scalings and folded deltas are formed in: at least float32, so bf16 rounds once, at the end."""
    return torch.promote_types(dtype, torch.float32)


def factor_dtype(weight_dtype: torch.dtype, precision: str) -> torch.dtype:
    """The dtype to store the stacked factors in for a model of ``weight_dtype`` trained at ``precision``
    (Lightning's name): under mixed precision, the autocast dtype, since autocast runs the low-rank
    GEMMs in it anyway (float32 factors would be cast again at every call, and each cast kept for the
    backward: three times the factors' half-precision memory); else at least float32. ``c_rep``
    keeps its float32 precision either way."""
    autocast = AUTOCAST_DTYPES.get(precision)
    if autocast is not None:
        return autocast
    return compute_dtype(weight_dtype)


def _check_group(coefficients: Coefficients, group: int) -> None:
    if not 0 <= group < coefficients.groups:
        raise ValueError(f"group {group} is out of range for {coefficients.groups} coefficient groups")


class FusedLoRALinear(nn.Module):
    """``base(x) + ((x A_cat^T) * c_rep) B_cat^T`` with ``c_rep`` each adapter's coefficient times its
    scaling, repeated over its rank. The factors are non-persistent buffers: frozen, out of the
    optimizer and out of checkpoints. ``dtype`` is the low-rank path's dtype (default: the base's)."""

    def __init__(
        self,
        base: nn.Linear,
        A_cat: Tensor,
        B_cat: Tensor,
        scalings: Tensor,
        ranks: list[int],
        coefficients: Coefficients,
        group: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        total = sum(ranks)
        if A_cat.shape != (total, base.in_features) or B_cat.shape != (base.out_features, total):
            raise ValueError(
                f"factors A {list(A_cat.shape)}, B {list(B_cat.shape)} do not fit ranks {ranks} "
                f"of a linear {base.in_features} -> {base.out_features}"
            )
        if not len(ranks) == len(scalings) == coefficients.n_adapters:
            raise ValueError(f"{len(ranks)} ranks and {len(scalings)} scalings for {coefficients.n_adapters} adapters")
        _check_group(coefficients, group)
        device, dtype = base.weight.device, dtype or base.weight.dtype
        self.base = base
        self.coefficients = coefficients
        self.group = group
        self.ranks = list(ranks)
        self.register_buffer("A_cat", A_cat.to(device, dtype), persistent=False)
        self.register_buffer("B_cat", B_cat.to(device, dtype), persistent=False)
        self.register_buffer("scalings", scalings.to(device, compute_dtype(dtype)), persistent=False)
        # Adapter index of each of the R rank rows: a gather, no host sync as repeat_interleave with a list has.
        rank_index = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))
        self.register_buffer("rank_index", rank_index.to(device), persistent=False)
        # Set by ScaleTable: the model-wide table that computes every module's c_rep once per model forward.
        self.table: ScaleTable | None = None
        self.slot = 0
        # First of this module's rows in rank-wise coefficients (set by ``attach``; others ignore it).
        self.row_start = 0

    def scaled_coefficients(self) -> Tensor:
        """``c_rep`` [R]: each rank row's coefficient (this group's, for its adapter) times its scaling."""
        rows = torch.arange(self.row_start, self.row_start + len(self.rank_index), device=self.rank_index.device)
        values = self.coefficients.row_values(self.group, self.rank_index, rows)
        return values * self.scalings[self.rank_index]

    def forward(self, x: Tensor) -> Tensor:
        chunks = self.table.chunks if self.table is not None else None
        c_rep = chunks[self.slot] if chunks is not None else self.scaled_coefficients()
        rows = x.reshape(-1, x.shape[-1])
        mixing = self.coefficients.mixing_matrix(self.row_start)
        if mixing is None and self.folds(rows):
            y = self.folded_forward(rows, c_rep)
        else:
            y = self.factor_forward(rows, c_rep, mixing)
        return y.view(*x.shape[:-1], y.shape[-1])

    def folds(self, rows: Tensor) -> bool:
        """Whether :meth:`folded_forward` is the cheaper path for ``rows`` [T, in]: folding costs
        ``out * R * in``, the factor path ``T * R * (in + out)`` forward and again backward. Both
        compute the same function (up to rounding); autocast and a merged path whose dtype is not
        the base's take the factor path."""
        weight = self.base.weight
        out_features, in_features = weight.shape
        return (
            weight.dtype == self.A_cat.dtype
            and not weight.requires_grad
            and not torch.is_autocast_enabled(rows.device.type)
            and out_features * in_features < rows.shape[0] * (in_features + out_features)
        )

    def folded_forward(self, rows: Tensor, c_rep: Tensor) -> Tensor:
        """``rows (W + B_cat diag(c_rep) A_cat)^T + b`` through :class:`_FoldedLoRALinear`."""
        return _FoldedLoRALinear.apply(rows, self.base.weight, self.base.bias, self.A_cat, self.B_cat, c_rep)

    def factor_forward(self, rows: Tensor, c_rep: Tensor, mixing: Tensor | None = None) -> Tensor:
        """``base(rows) + (low * c_rep) B_cat^T``, ``low = rows A_cat^T``: two thin GEMMs, no
        weight-sized tensor; with a rank-mixing matrix ``N`` (the only path that has one), the rank
        rows get ``+ (low N^T) * s_rep`` too."""
        y = self.base(rows)
        low = F.linear(rows.to(self.A_cat.dtype), self.A_cat)
        autocast = torch.is_autocast_enabled(rows.device.type)
        if not autocast:
            c_rep = c_rep.to(low.dtype)
            mixing = None if mixing is None else mixing.to(low.dtype)
        # Under autocast c_rep stays in its own (float32) precision, whatever the factors are stored in.
        scaled = low * c_rep
        if mixing is not None:
            scaled = scaled + F.linear(low, mixing) * self.scalings[self.rank_index].to(scaled.dtype)
        if autocast or scaled.dtype == y.dtype:
            # Accumulated into the base output by the GEMM itself (under autocast, addmm casts all
            # three to the autocast dtype): no separate low-rank output, no add.
            return torch.addmm(y, scaled, self.B_cat.t())
        return y + F.linear(scaled, self.B_cat).to(y.dtype)

    def merged_delta(self) -> Tensor:
        """``B_cat (diag(c_rep) + diag(s_rep) N) A_cat`` [out, in] with the current coefficients (``N``:
        the rank-mixing matrix, if any), in at least float32."""
        dtype = compute_dtype(self.A_cat.dtype)
        B, A = self.B_cat.to(dtype), self.A_cat.to(dtype)
        delta = (B * self.scaled_coefficients().to(dtype)) @ A
        mixing = self.coefficients.mixing_matrix(self.row_start)
        if mixing is not None:
            delta = delta + ((B * self.scalings[self.rank_index].to(dtype)) @ mixing.to(dtype)) @ A
        return delta

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, group={self.group}"


class _FoldedLoRALinear(torch.autograd.Function):
    """``x (W + B_cat diag(c_rep) A_cat)^T + b`` with the update folded into the weight: the
    forward is one GEMM, as for the plain linear, and ``c_rep``'s gradient,
    ``sum_rows (g B_cat) * (x A_cat^T)``, two thin GEMMs (see :meth:`FusedLoRALinear.folds`).

    The folded weight lives only while it is used: the backward folds again for the input
    gradient ``g (W + B_cat diag(c_rep) A_cat)`` when that is cheaper (fewer output features than
    rows), else adds ``((g B_cat) * c_rep) A_cat`` to ``g W``. Saving it instead would keep a new
    weight-sized tensor per module until the backward, and writing fresh memory that size every
    step (page faults) costs more than the GEMM that refolds it. ``W``, ``b`` and the factors are
    frozen; ``c_rep`` may be of a wider dtype (the fold is formed in it and rounded once)."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor | None, A_cat: Tensor, B_cat: Tensor, c_rep: Tensor):  # noqa: ANN205
        projected = F.linear(rows, A_cat) if ctx.needs_input_grad[5] else None
        ctx.save_for_backward(weight, A_cat, B_cat, c_rep, projected)
        ctx.rows = rows.shape[0]
        return F.linear(rows, _fold(weight, A_cat, B_cat, c_rep), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN205
        weight, A_cat, B_cat, c_rep, projected = ctx.saved_tensors
        refold = weight.shape[0] < ctx.rows
        needs_rows = ctx.needs_input_grad[0]
        grad_low = grad @ B_cat if projected is not None or (needs_rows and not refold) else None
        grad_rows = grad_c = None
        if needs_rows and refold:
            grad_rows = grad @ _fold(weight, A_cat, B_cat, c_rep)
        elif needs_rows:
            grad_rows = torch.addmm(grad @ weight, grad_low * c_rep.to(grad_low.dtype), A_cat)
        if projected is not None:
            grad_c = (grad_low.to(c_rep.dtype) * projected.to(c_rep.dtype)).sum(dim=0)
        return grad_rows, None, None, None, None, grad_c


def _fold(weight: Tensor, A_cat: Tensor, B_cat: Tensor, c_rep: Tensor) -> Tensor:
    """``W + B_cat diag(c_rep) A_cat`` formed in ``c_rep``'s dtype, rounded to ``W``'s once."""
    dtype = c_rep.dtype
    return torch.addmm(weight.to(dtype), B_cat.to(dtype) * c_rep, A_cat.to(dtype)).to(weight.dtype)


class ScaleTable:
    """Every fused module's ``c_rep`` from one gather and one product per model forward, instead
    of a parametrization, select, product and gather per module (and their backward) in every
    module. :meth:`fill` runs before the model's forward and :meth:`clear` after it; a module
    called on its own, or while cleared, computes its ``c_rep`` itself."""

    def __init__(self, modules: list[FusedLoRALinear]) -> None:
        self.sizes = [sum(module.ranks) for module in modules]
        dtype = functools.reduce(torch.promote_types, (module.scalings.dtype for module in modules))
        # All three on the CPU, whatever the default device (Lightning builds the model under its root
        # device): fill moves them together, and a split between devices would fail there.
        group = [torch.full((size,), m.group, device="cpu") for m, size in zip(modules, self.sizes)]
        self.group = torch.cat(group)
        self.adapter = torch.cat([module.rank_index.cpu() for module in modules])
        self.scaling = torch.cat([module.scalings.cpu().to(dtype)[module.rank_index.cpu()] for module in modules])
        self.rows = torch.cat(
            [torch.arange(m.row_start, m.row_start + size, device="cpu") for m, size in zip(modules, self.sizes)]
        )
        self.chunks: tuple[Tensor, ...] | None = None
        for slot, module in enumerate(modules):
            module.table, module.slot = self, slot

    def fill(self, coefficients: Coefficients) -> None:
        """Compute every module's ``c_rep`` from ``coefficients`` (one gather, product and split for all)."""
        device = coefficients.raw.device
        if self.group.device != device:
            self.group, self.adapter, self.scaling, self.rows = (
                t.to(device) for t in (self.group, self.adapter, self.scaling, self.rows)
            )
        self.chunks = (coefficients.row_values(self.group, self.adapter, self.rows) * self.scaling).split(self.sizes)

    def clear(self) -> None:
        """Drop the chunks (and the graph they hold) once the forward is done."""
        self.chunks = None


class DenseMergedLinear(nn.Module):
    """The dense reference ``(W + sum_i c_i delta_i) x`` with task vectors ``deltas`` [n, out, in]
    (a non-persistent buffer), rebuilt at every call; also the fallback for task vectors that are not LoRA."""

    def __init__(
        self,
        base: nn.Linear,
        deltas: Tensor,
        coefficients: Coefficients,
        group: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if deltas.shape != (coefficients.n_adapters, base.out_features, base.in_features):
            raise ValueError(
                f"deltas {list(deltas.shape)} do not fit {coefficients.n_adapters} adapters "
                f"of a linear {base.in_features} -> {base.out_features}"
            )
        _check_group(coefficients, group)
        self.base = base
        self.coefficients = coefficients
        self.group = group
        self.register_buffer("deltas", deltas.to(base.weight.device, dtype or base.weight.dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.base.weight
        c = self.coefficients()[self.group].to(self.deltas.dtype)
        merged = weight + torch.einsum("n,noi->oi", c, self.deltas).to(weight.dtype)
        return F.linear(x, merged, self.base.bias)

    def merged_delta(self) -> Tensor:
        """``sum_i c_i delta_i`` [out, in] with the current coefficients, in at least float32."""
        dtype = compute_dtype(self.deltas.dtype)
        return torch.einsum("n,noi->oi", self.coefficients()[self.group].to(dtype), self.deltas.to(dtype))
