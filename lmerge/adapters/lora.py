"""Load one PEFT LoRA adapter directory lazily and safely (safetensors only, never pickle)."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lmerge.adapters.base_layout import PEFT_PREFIX, BaseLayout, check_adapter, layout_for
from lmerge.adapters.peft_fields import check_peft_config
from lmerge.adapters.tensor_file import DTYPES, FileDigest, read_entries, read_tensor
from lmerge.errors import AdapterError
from lmerge.yaml_files import read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# Task heads of a merged adapter directory (one safetensors file per task), beside its LoRA.
HEADS_DIR = "heads"
_LORA_SUFFIX = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")
# Only these tensor kinds carry a LoRA we cannot merge: name them instead of a generic "unexpected".
_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA magnitude vectors (use_dora) cannot be merged as plain LoRA",
    "lora_embedding_": "LoRA on embedding layers is not supported",
}
# Tensors PEFT saves beside the factors that do not change the update B A (VeLoRA's training-time
# projection buffers): skipped.
_TRAINING_ONLY = re.compile(r"\.lora_velora_embed(\.[^.]+)?$")


@dataclass(frozen=True)
class ModuleShape:
    """Shape of one LoRA module: rank, input and output features."""

    rank: int
    in_features: int
    out_features: int


class LoraAdapter:
    """A PEFT LoRA adapter on disk. At load, its config is checked field by field
    (:mod:`lmerge.adapters.peft_fields`) and its safetensors header against itself and, when the
    base model's config is at hand, against the base's layers (:mod:`lmerge.adapters.base_layout`);
    tensors are read (and checked for NaN/Inf) when a module is asked for."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        self.config = _read_config(self.path)
        self.weights_file = _weights_file(self.path)
        check_peft_config(self.config, self.path / CONFIG_FILE)
        self.shapes, self.head_shapes, self._tensor_names = self._read_header()
        self._entries = read_entries(self.weights_file)  # a header safe_open has just accepted
        self._handle = None  # the weights file, while a ``reading()`` block holds it open
        self._digest = FileDigest()  # its SHA-256, as far as reads have passed over it
        layout = layout_for(self.base_model, self.task_type, self.config.get("auto_mapping"), self.revision)
        # Why the adapter could not be checked against its base model (None: it was).
        self.unchecked_reason = layout if isinstance(layout, str) else None
        if not isinstance(layout, str):
            self.check_against(layout)

    # ---- public facts ----------------------------------------------------------------------
    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def revision(self) -> str | None:
        return self.config.get("revision")

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    @property
    def module_keys(self) -> list[str]:
        return list(self.shapes)

    @cached_property
    def dtype(self) -> torch.dtype:
        """The dtype the LoRA factors are stored in."""
        a_name, _ = next(iter(self._tensor_names.values()))
        return DTYPES.get(self._entries[a_name].dtype, torch.float32)

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @cached_property
    def sha256(self) -> str:
        """The weights file's SHA-256 (what factor reads have hashed already is not read again)."""
        with self.reading():
            try:
                return self._digest.finish(self._handle)
            except OSError as exc:
                raise AdapterError(f"{self.weights_file}: cannot be read ({exc})") from None

    def scaling(self, key: str) -> float:
        """PEFT's scaling of module ``key``: alpha / r, or alpha / sqrt(r) with rslora."""
        rank = self.shapes[key].rank
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, key, self.config["lora_alpha"]))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def factors(self, key: str, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` of module ``key`` in float32 (fresh tensors, the caller's
        own), checked finite unless ``check`` is false (:func:`module_factors` checks many at once)."""
        a_name, b_name = self._tensor_names[key]
        A, B = self._read(a_name, check=False), self._read(b_name, check=False)
        if check:
            self.check_finite(key, [A], [B])
        return A.float(), B.float()

    def check_finite(self, key: str, As: list[torch.Tensor], Bs: list[torch.Tensor]) -> None:
        """Refuse, naming the tensor, when one of this adapter's factors for ``key`` holds NaN or Inf."""
        bad = first_nonfinite([*As, *Bs])
        if bad is not None:
            tensor = self._tensor_names[key][bad >= len(As)]
            raise AdapterError(f"{self.weights_file}: tensor {tensor} holds NaN or Inf values")

    def head_state(self) -> dict[str, torch.Tensor]:
        """The task-head tensors PEFT saved from ``modules_to_save``, under their file names."""
        return {name: self._read(name) for name in self.head_shapes}

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the weights file open for the block (a descriptor only, nothing mapped): its
        reads share one handle instead of opening the file per tensor. Nested blocks share the
        outermost one's handle."""
        if self._handle is not None:
            yield
            return
        try:
            handle = open(self.weights_file, "rb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as exc:
            raise AdapterError(f"{self.weights_file}: cannot be read ({exc.strerror or exc})") from None
        self._handle = handle
        try:
            yield
        finally:
            self._handle = None
            handle.close()

    # ---- loading -------------------------------------------------------------------------------
    def check_against(self, layout: BaseLayout) -> None:
        """Refuse the adapter, naming the module or head, unless every factor and head fits the
        base model ``layout`` (module keys name its linear layers, features match)."""
        check_adapter(
            layout, self.shapes, self.head_shapes, self.fan_in_fan_out, self.weights_file, self.path / CONFIG_FILE
        )

    def _read_header(self) -> tuple[dict[str, ModuleShape], dict[str, list[int]], dict[str, tuple[str, str]]]:
        found: dict[str, dict[str, list[int]]] = {}
        names: dict[str, dict[str, str]] = {}
        heads: dict[str, list[int]] = {}
        head_modules = tuple(self.config.get("modules_to_save") or ())
        with self._open() as handle:
            for tensor in handle.keys():
                for marker, reason in _UNSUPPORTED.items():
                    if marker in tensor:
                        raise AdapterError(f"{self.weights_file}: {tensor}: {reason}")
                match = _LORA_SUFFIX.match(tensor)
                if _TRAINING_ONLY.search(tensor):
                    continue
                if match:
                    module = match["module"].removeprefix(PEFT_PREFIX)
                    found.setdefault(module, {})[match["which"]] = handle.get_slice(tensor).get_shape()
                    names.setdefault(module, {})[match["which"]] = tensor
                elif _belongs_to(tensor.removeprefix(PEFT_PREFIX), head_modules):
                    heads[tensor] = handle.get_slice(tensor).get_shape()
                else:
                    raise AdapterError(f"{self.weights_file}: tensor {tensor!r} is neither LoRA nor in modules_to_save")
        if not found:
            raise AdapterError(f"{self.weights_file}: holds no LoRA tensors")
        shapes = {module: self._module_shape(module, parts) for module, parts in found.items()}
        return shapes, heads, {module: (pair["A"], pair["B"]) for module, pair in names.items()}

    def _module_shape(self, module: str, parts: dict[str, list[int]]) -> ModuleShape:
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise AdapterError(f"{self.weights_file}: module {module} has no {missing} tensor")
        a_shape, b_shape = parts["A"], parts["B"]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterError(
                f"{self.weights_file}: module {module}: only linear LoRA merges (lora_A {a_shape}, lora_B {b_shape})"
            )
        if a_shape[0] != b_shape[1]:
            raise AdapterError(
                f"{self.weights_file}: module {module}: rank mismatch, lora_A {a_shape} vs lora_B {b_shape}"
            )
        expected = int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8)))
        if a_shape[0] != expected:
            raise AdapterError(
                f"{self.weights_file}: module {module} has rank {a_shape[0]} but {CONFIG_FILE} says {expected}"
            )
        return ModuleShape(rank=a_shape[0], in_features=a_shape[1], out_features=b_shape[0])

    def _open(self):  # noqa: ANN202 - safetensors' handle type is private
        try:
            return safe_open(str(self.weights_file), framework="pt")
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"{self.weights_file}: not a readable safetensors file ({exc})") from None

    def _read(self, tensor: str, check: bool = True) -> torch.Tensor:
        entry = self._entries[tensor]
        try:
            if entry.dtype not in DTYPES:  # a head of another dtype: safetensors converts it
                with self._open() as handle:
                    value = handle.get_tensor(tensor)
            else:
                with self.reading():
                    value = read_tensor(self._handle, entry, self._digest)
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"{self.weights_file}: cannot read {tensor} ({exc})") from None
        if check and value.is_floating_point() and first_nonfinite([value]) is not None:
            raise AdapterError(f"{self.weights_file}: tensor {tensor} holds NaN or Inf values")
        return value


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory does not exist")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: missing; not a PEFT adapter directory")
    config = read_json(config_path, "adapter config", error=AdapterError)
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    return config


def _weights_file(path: Path) -> Path:
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        return weights
    if (path / PICKLE_FILE).exists():
        raise AdapterError(
            f"{path / PICKLE_FILE}: pickle weights are refused (loading them can run code); "
            "convert the adapter to safetensors"
        )
    raise AdapterError(f"{weights}: missing")


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern matching a suffix of the key."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _belongs_to(tensor: str, modules: tuple[str, ...]) -> bool:
    return any(tensor.startswith(f"{module}.") or f".{module}." in f".{tensor}" for module in modules if module)


def saved_dtype(adapters: list[LoraAdapter]) -> torch.dtype:
    """The dtype a LoRA merged from ``adapters`` is saved in: the widest of theirs, in any order
    (torch's promotion: float16 with bfloat16 gives float32)."""
    return functools.reduce(torch.promote_types, [adapter.dtype for adapter in adapters])


def module_factors(adapters: list[LoraAdapter], key: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every adapter's ``(A, B)`` of module ``key`` (float32, fresh), all checked finite at once."""
    pairs = [adapter.factors(key, check=False) for adapter in adapters]
    As, Bs = [A for A, _ in pairs], [B for _, B in pairs]
    if first_nonfinite([*As, *Bs]) is not None:
        for adapter, A, B in zip(adapters, As, Bs, strict=True):
            adapter.check_finite(key, [A], [B])
    return As, Bs


_PRODUCT_BLOCK = 1 << 20
"""Entries of ``B @ A`` :func:`product_rows` computes at a time (4 MiB of float32)."""


def product_rows(A: torch.Tensor, B: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """``B @ A`` a block of rows at a time, each with the rows it holds: never all of it at once."""
    rows = max(1, _PRODUCT_BLOCK // max(1, A.shape[1]))
    for start in range(0, B.shape[0], rows):
        yield slice(start, start + rows), B[start : start + rows] @ A


def product_within(A: torch.Tensor, B: torch.Tensor, limit: float) -> bool:
    """Whether every entry of ``B @ A`` (finite factors) is within ``limit`` in magnitude: from the
    bound ``sum_k max|B[:, k]| max|A[k, :]|``, and only where that bound is over it, from the
    product itself (:func:`product_rows`)."""
    if float((B.abs().amax(dim=0) * A.abs().amax(dim=1)).sum()) <= limit:
        return True
    return all(float(block.abs().amax()) <= limit for _, block in product_rows(A, B))


def first_nonfinite(tensors: list[torch.Tensor], limit: float = math.inf) -> int | None:
    """The index of the first tensor holding NaN, Inf or a magnitude above ``limit``, or None.

    One batched reduction for the lot: per tensor, the Python calls of a check cost more than
    its arithmetic on a LoRA factor. The Euclidean norm (a vectorized batched kernel; the
    maximum's is not) propagates NaN and Inf and bounds every magnitude, so a finite norm within
    ``limit`` clears a tensor; one that is not (a norm can overflow) gets the exact check."""
    indices = [i for i, t in enumerate(tensors) if t.numel()]
    if not indices:
        return None
    norms = torch.stack(torch._foreach_norm([tensors[i] for i in indices], 2))
    cleared = torch.isfinite(norms) & (norms <= limit)
    if bool(cleared.all()):
        return None
    for i in cleared.logical_not().nonzero().flatten().tolist():
        low, high = torch.aminmax(tensors[indices[i]])
        if not bool(torch.isfinite(low) & torch.isfinite(high) & (low >= -limit) & (high <= limit)):
            return indices[i]
    return None
