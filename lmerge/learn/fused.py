"""Fused LoRA linear: a model whose targeted linears compute ``W x + sum_i c_i s_i B_i A_i x`` with
two GEMMs per module whatever the number of adapters, gradients reaching only the coefficients;
``fold`` writes the merge into the weights once so evaluation runs at the base model's speed.
The layers themselves are in :mod:`lmerge.learn.merged_linear`; this module attaches them to a model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lmerge.adapters.lora import LoraAdapter
from lmerge.errors import AdapterError, ConfigError, unknown_name
from lmerge.layers import layer_index
from lmerge.learn.coefficients import Coefficients
from lmerge.learn.merged_linear import DenseMergedLinear, FusedLoRALinear, ScaleTable, compute_dtype

IMPLEMENTATIONS = ("fused_lora_linear", "dense")
GRANULARITIES = ("task_wise", "layer_wise", "rank_wise")


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
    for key, module in modules.items():
        module.row_start = coefficients.row_start(key)
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
        work = compute_dtype(dtype or base.weight.dtype)
        deltas = torch.stack([s * (B.to(work) @ A.to(work)) for s, A, B in zip(scalings, As, Bs, strict=True)])
        return DenseMergedLinear(base, deltas, coefficients, group, dtype)
    A_cat, B_cat = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
    ranks = [A.shape[0] for A in As]
    return FusedLoRALinear(
        base, A_cat, B_cat, torch.tensor(scalings, dtype=torch.float64), ranks, coefficients, group, dtype
    )


def layer_groups(keys: list[str], granularity: str) -> tuple[list[str], list[int | None], Callable[[str], int]]:
    """Coefficient groups for ``keys``: ``(group_names, group_layers, group_of)``. ``task_wise``: one
    group "all"; ``layer_wise`` (and ``rank_wise``, whose adapter-level coefficients are layer-wise):
    one group per layer index in the keys, sorted, then "other" for the keys without a layer index
    if there are any."""
    if granularity == "task_wise":
        return ["all"], [None], lambda key: 0
    if granularity not in GRANULARITIES:
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
