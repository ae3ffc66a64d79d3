"""Fused LoRA linear: a model whose targeted linears compute ``W x + sum_i c_i s_i B_i A_i x`` with
two GEMMs per module whatever the number of adapters, gradients reaching only the coefficients;
``fold`` writes the merge into the weights once so evaluation runs at the base model's speed."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmerge.adapters.lora import LoraAdapter
from lmerge.coefficients import Coefficients
from lmerge.errors import AdapterError, ConfigError, unknown_name
from lmerge.layers import layer_index

IMPLEMENTATIONS = ("fused_lora_linear", "dense")
GRANULARITIES = ("task_wise", "layer_wise")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Scalings and folded deltas are formed in at least float32, so bf16 rounds once, at the end.
    return torch.promote_types(dtype, torch.float32)


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
        self.register_buffer("scalings", scalings.to(device, _compute_dtype(dtype)), persistent=False)
        # Adapter index of each of the R rank rows: a gather, no host sync as repeat_interleave with a list has.
        rank_index = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))
        self.register_buffer("rank_index", rank_index.to(device), persistent=False)
        # Set by ScaleTable: the model-wide table that computes every module's c_rep once per model forward.
        self.table: ScaleTable | None = None
        self.slot = 0

    def scaled_coefficients(self) -> Tensor:
        """``c_rep`` [R]: this group's coefficients times the scalings, repeated over each rank."""
        return (self.coefficients()[self.group] * self.scalings)[self.rank_index]

    def forward(self, x: Tensor) -> Tensor:
        chunks = self.table.chunks if self.table is not None else None
        c_rep = chunks[self.slot] if chunks is not None else self.scaled_coefficients()
        rows = x.reshape(-1, x.shape[-1])
        y = self.folded_forward(rows, c_rep) if self.folds(rows) else self.factor_forward(rows, c_rep)
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

    def factor_forward(self, rows: Tensor, c_rep: Tensor) -> Tensor:
        """``base(rows) + ((rows A_cat^T) * c_rep) B_cat^T``: two thin GEMMs, no weight-sized tensor."""
        y = self.base(rows)
        low = F.linear(rows.to(self.A_cat.dtype), self.A_cat) * c_rep.to(self.A_cat.dtype)
        if low.dtype == y.dtype or torch.is_autocast_enabled(rows.device.type):
            # Accumulated into the base output by the GEMM itself: no separate low-rank output, no add
            # (under autocast, addmm casts all three to the autocast dtype).
            return torch.addmm(y, low, self.B_cat.t())
        return y + F.linear(low, self.B_cat).to(y.dtype)

    def merged_delta(self) -> Tensor:
        """``B_cat diag(c_rep) A_cat`` [out, in] with the current coefficients, in at least float32."""
        dtype = _compute_dtype(self.A_cat.dtype)
        return (self.B_cat.to(dtype) * self.scaled_coefficients().to(dtype)) @ self.A_cat.to(dtype)

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
        grad_low = grad @ B_cat if projected is not None or weight.shape[0] >= ctx.rows else None
        grad_rows = grad_c = None
        if ctx.needs_input_grad[0]:
            if weight.shape[0] < ctx.rows:
                grad_rows = grad @ _fold(weight, A_cat, B_cat, c_rep)
            else:
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
        self.group = torch.cat([torch.full((size,), m.group) for m, size in zip(modules, self.sizes)])
        self.adapter = torch.cat([module.rank_index.cpu() for module in modules])
        self.scaling = torch.cat([module.scalings.cpu().to(dtype)[module.rank_index.cpu()] for module in modules])
        self.chunks: tuple[Tensor, ...] | None = None
        for slot, module in enumerate(modules):
            module.table, module.slot = self, slot

    def fill(self, coefficients: Coefficients) -> None:
        """Compute every module's ``c_rep`` from ``coefficients`` (one gather, product and split for all)."""
        values = coefficients()
        if self.group.device != values.device:
            self.group, self.adapter, self.scaling = (
                t.to(values.device) for t in (self.group, self.adapter, self.scaling)
            )
        self.chunks = (values[self.group, self.adapter] * self.scaling).split(self.sizes)

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
        dtype = _compute_dtype(self.deltas.dtype)
        return torch.einsum("n,noi->oi", self.coefficients()[self.group].to(dtype), self.deltas.to(dtype))


class FusedModel:
    """A model with fused (or dense) merged linears attached, as returned by :func:`attach`.
    ``fold``/``unfold`` switch between merged plain weights and the trainable fused form;
    ``detach`` gives the original model back."""

    def __init__(
        self,
        model: nn.Module,
        coefficients: Coefficients,
        modules: dict[str, FusedLoRALinear | DenseMergedLinear],
        group_layers: list[int | None],
        requires_grad: dict[str, bool],
    ) -> None:
        self.model = model
        self.coefficients = coefficients
        self.modules = modules
        self.group_layers = group_layers
        self.folded = False
        self.attached = True
        self._requires_grad = requires_grad
        self._originals: dict[str, Tensor] = {}
        fused = [module for module in modules.values() if isinstance(module, FusedLoRALinear)]
        self._table = ScaleTable(fused) if fused else None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._install_hooks()

    @contextlib.contextmanager
    def use_coefficients(self, coefficients: Coefficients) -> Iterator[None]:
        """Run the merged modules with ``coefficients`` (same groups and adapters) instead, e.g.
        one adapter alone; the learned ones are back on exit."""
        learned = self.coefficients
        self._set_coefficients(coefficients)
        try:
            yield
        finally:
            self._set_coefficients(learned)

    def _set_coefficients(self, coefficients: Coefficients) -> None:
        self.coefficients = coefficients
        for module in self.modules.values():
            module.coefficients = coefficients

    def _install_hooks(self) -> None:
        if self._table is None or self._hooks:
            return
        table = self._table
        self._hooks = [
            self.model.register_forward_pre_hook(lambda module, args: table.fill(self.coefficients)),
            # always_call: an exception in the forward must not leave a stale graph behind.
            self.model.register_forward_hook(lambda module, args, output: table.clear(), always_call=True),
        ]

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._table is not None:
            self._table.clear()

    @torch.no_grad()
    def fold(self) -> None:
        """Write ``W + merged delta`` (current coefficients) into each base linear and put the plain
        linears back; folding again starts from the original weights."""
        self._check_attached()
        for key, module in self.modules.items():
            weight = module.base.weight
            if key not in self._originals:
                self._originals[key] = weight.detach().clone()
            delta = module.merged_delta()
            dtype = torch.promote_types(weight.dtype, delta.dtype)
            weight.copy_(self._originals[key].to(dtype) + delta.to(dtype))
            _set_submodule(self.model, key, module.base)
        self._remove_hooks()
        self.folded = True

    def unfold(self) -> None:
        """Restore the original weights and re-install the fused modules (no-op unless folded)."""
        self._check_attached()
        if not self.folded:
            return
        self._restore_weights()
        for key, module in self.modules.items():
            _set_submodule(self.model, key, module)
        self._install_hooks()
        self.folded = False

    def detach(self) -> nn.Module:
        """Give the model back as it was: original weights, plain linears, original ``requires_grad``."""
        self._check_attached()
        self._restore_weights()
        for key, module in self.modules.items():
            _set_submodule(self.model, key, module.base)
        self._remove_hooks()
        for name, parameter in self.model.named_parameters():
            if name in self._requires_grad:
                parameter.requires_grad_(self._requires_grad[name])
        self.folded = False
        self.attached = False
        return self.model

    @torch.no_grad()
    def _restore_weights(self) -> None:
        for key, original in self._originals.items():
            self.modules[key].base.weight.copy_(original)
        # The copies are only needed while folded; dropping them frees memory for training.
        self._originals.clear()

    def _check_attached(self) -> None:
        if not self.attached:
            raise RuntimeError("this FusedModel was detached; attach the adapters again")


def attach(
    model: nn.Module,
    adapters: list[LoraAdapter],
    keys: list[str],
    coefficients: Coefficients,
    group_of: Callable[[str], int],
    impl: str = "fused_lora_linear",
    dtype: torch.dtype | None = None,
) -> FusedModel:
    """Replace each linear ``model.get_submodule(key)`` by a :class:`FusedLoRALinear` (or, with
    ``impl="dense"``, a :class:`DenseMergedLinear`) using coefficient group ``group_of(key)``.
    Every model parameter is frozen; ``coefficients`` moves to the model's device and its ``raw``
    is the only trainable parameter left. ``dtype``: the dtype of the merged path (default: each base
    weight's)."""
    if impl not in IMPLEMENTATIONS:
        raise ConfigError("impl: " + unknown_name("implementation", impl, list(IMPLEMENTATIONS)))
    if len(adapters) != coefficients.n_adapters:
        raise ConfigError(f"coefficients: {coefficients.n_adapters} per group for {len(adapters)} adapters")
    fan_in_fan_out = [a.name for a in adapters if a.fan_in_fan_out]
    if fan_in_fan_out:
        raise AdapterError(
            f"adapter {fan_in_fan_out[0]!r} has fan_in_fan_out (GPT-2 Conv1D layers); "
            "learned coefficients support nn.Linear layers only"
        )
    bases = {key: _linear(model, key, adapters) for key in keys}
    groups = {key: group_of(key) for key in keys}
    for key, group in groups.items():
        if not 0 <= group < coefficients.groups:
            raise ConfigError(f"module {key}: coefficient group {group} is out of range ({coefficients.groups} groups)")
    if bases:
        coefficients.to(next(iter(bases.values())).weight.device)
    # Every merged module is built (adapter tensors read and checked) before the model is touched,
    # so a bad tensor in some adapter (NaN, unreadable) leaves the model as it was.
    modules = {
        key: _merged_linear(adapters, key, base, coefficients, groups[key], impl, dtype) for key, base in bases.items()
    }
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    for key, module in modules.items():
        _set_submodule(model, key, module)
    return FusedModel(model, coefficients, modules, _group_layers(keys, groups, coefficients.groups), requires_grad)


def _merged_linear(
    adapters: list[LoraAdapter],
    key: str,
    base: nn.Linear,
    coefficients: Coefficients,
    group: int,
    impl: str,
    dtype: torch.dtype | None,
) -> FusedLoRALinear | DenseMergedLinear:
    As, Bs = zip(*(adapter.factors(key) for adapter in adapters), strict=True)
    scalings = [adapter.scaling(key) for adapter in adapters]
    if impl == "dense":
        work = _compute_dtype(dtype or base.weight.dtype)
        deltas = torch.stack([s * (B.to(work) @ A.to(work)) for s, A, B in zip(scalings, As, Bs, strict=True)])
        return DenseMergedLinear(base, deltas, coefficients, group, dtype)
    A_cat, B_cat = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
    ranks = [A.shape[0] for A in As]
    return FusedLoRALinear(
        base, A_cat, B_cat, torch.tensor(scalings, dtype=torch.float64), ranks, coefficients, group, dtype
    )


def layer_groups(keys: list[str], granularity: str) -> tuple[list[str], list[int | None], Callable[[str], int]]:
    """Coefficient groups for ``keys``: ``(group_names, group_layers, group_of)``. ``task_wise``: one
    group "all"; ``layer_wise``: one group per layer index in the keys, sorted, then "other" for the
    keys without a layer index if there are any."""
    if granularity == "task_wise":
        return ["all"], [None], lambda key: 0
    if granularity != "layer_wise":
        raise ConfigError("granularity: " + unknown_name("granularity", granularity, list(GRANULARITIES)))
    found = {layer_index(key) for key in keys}
    layers: list[int | None] = [*sorted(found - {None}), *([None] if None in found else [])]
    index = {layer: group for group, layer in enumerate(layers)}

    def group_of(key: str) -> int:
        layer = layer_index(key)
        if layer not in index:
            raise ConfigError(f"module {key}: no coefficient group for layer {layer}")
        return index[layer]

    return [f"layer.{layer}" if layer is not None else "other" for layer in layers], layers, group_of


def _group_layers(keys: list[str], groups: dict[str, int], n_groups: int) -> list[int | None]:
    """Each group's layer when all its modules share one layer index, else ``None``."""
    members: list[set[int | None]] = [set() for _ in range(n_groups)]
    for key in keys:
        members[groups[key]].add(layer_index(key))
    return [next(iter(layers)) if len(layers) == 1 else None for layers in members]


def _linear(model: nn.Module, key: str, adapters: list[LoraAdapter]) -> nn.Linear:
    """The linear at ``key``, checked against every adapter's shape before the model is touched."""
    try:
        module = model.get_submodule(key)
    except AttributeError:
        raise AdapterError(f"the model has no module {key!r} that the adapters target") from None
    if not isinstance(module, nn.Linear):
        raise AdapterError(f"module {key!r} is a {type(module).__name__}; only nn.Linear layers can be fused")
    for adapter in adapters:
        shape = adapter.shapes.get(key)
        if shape is None:
            raise AdapterError(f"adapter {adapter.name!r} has no module {key!r}")
        if (shape.out_features, shape.in_features) != (module.out_features, module.in_features):
            raise AdapterError(
                f"module {key}: adapter {adapter.name!r} is [{shape.out_features}x{shape.in_features}] but "
                f"the model's linear is [{module.out_features}x{module.in_features}]; it was made for another model"
            )
    return module


def _set_submodule(model: nn.Module, key: str, module: nn.Module) -> None:
    parent, _, name = key.rpartition(".")
    setattr(model.get_submodule(parent), name, module)
