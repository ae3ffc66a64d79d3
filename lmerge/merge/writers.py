"""Write a merge: as a PEFT LoRA adapter (exact for factor, linear and low-rank methods and dense
ones in core space unless a lower rank is asked for, truncated SVD for dense ones in weight
space), as full merged weights, or not at all. Task heads travel alongside."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmerge.adapters.lora import (
    CONFIG_FILE,
    HEADS_DIR,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    LoraAdapter,
    product_rows,
    saved_dtype,
)
from lmerge.errors import AdapterError, OutputError
from lmerge.merge.engine import MergedModule
from lmerge.methods._products import product_svds
from lmerge.methods._unit_scale import unit_scale
from lmerge.outputs.tensor_stream import StreamedTensors, header_room
from lmerge.tasks.heads import has_head, read_head, write_head

# Task types whose head belongs to each task (saved per adapter), so the full-weights save
# keeps the shared backbone only.
_HEAD_TASKS = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


_OVERSAMPLE = 16
"""Extra columns of the randomized range finder. Each pass over the merged matrix costs about
the same for any small number of columns (it is memory bound), so a generous oversampling with
one power iteration matches two iterations with few columns at two thirds of the passes."""


_SKETCH_SEED = 0
"""Seed of the randomized SVD's Gaussian test matrix, drawn from a generator of its own: the same
merge saves the same LoRA in every run and whichever worker thread saves it. (``torch.svd_lowrank``
draws from the global RNG: a DARE merge saved at rank 32 scored 80.8% and 81.7% on the demo in
two runs of the same command, its flat spectrum's top directions being a matter of the draw.)"""


def truncated_svd(delta: torch.Tensor, rank: int, niter: int = 1) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [k, in], B [out, k], relative Frobenius error)`` with ``B @ A`` the best rank-``k``
    approximation found by a randomized SVD (Halko et al.'s range finder with ``niter`` power
    iterations, each step orthonormalized: a few GEMMs, not a full decomposition)."""
    rank = min(rank, *delta.shape)
    total = float(delta.square().sum())
    if total == 0.0:
        return delta.new_zeros(rank, delta.shape[1]), delta.new_zeros(delta.shape[0], rank), 0.0
    columns = min(rank + _OVERSAMPLE, *delta.shape)
    sketch = torch.randn(delta.shape[1], columns, generator=torch.Generator().manual_seed(_SKETCH_SEED))
    Q = torch.linalg.qr(delta @ sketch.to(delta.dtype)).Q
    for _ in range(niter):
        Q = torch.linalg.qr(delta @ torch.linalg.qr(delta.T @ Q).Q).Q
    P, S, Vh = torch.linalg.svd(Q.T @ delta, full_matrices=False)
    P, S, Vh = P[:, :rank], S[:rank], Vh[:rank]
    A, B = Vh.contiguous(), ((Q @ P) * S).contiguous()
    # B A = U_k U_k^T delta, a projection, so ||delta - B A||^2 = ||delta||^2 - sum(S_k^2); where
    # that difference is within the rounding of its terms (a small error), the residual itself.
    error = _relative_error(total, float(S.square().sum()))
    return A, B, error if error > _SUBTRACTED_ERROR else _residual_error(delta, A, B, total)


_SUBTRACTED_ERROR = 1e-2
"""Below this, a relative error from ``||delta||^2 - ||B A||^2`` (float32 sums, rounded to about
``1e-7`` of ``||delta||^2`` each) is mostly rounding: its square root magnifies it to ``3e-4``."""


def _residual_error(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, total: float) -> float:
    """``||delta - B A|| / ||delta||`` (Frobenius, ``total`` the squared norm of ``delta``),
    computed a block of rows at a time (:func:`product_rows`): never a second ``[out, in]`` matrix."""
    residual = sum(float((delta[rows] - block).square().sum()) for rows, block in product_rows(A, B))
    return (residual / total) ** 0.5


def truncated_factors(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A' [k, in], B' [out, k], relative Frobenius error)`` with ``B' @ A'`` the best rank-``k``
    approximation of ``B @ A`` (``k = min(rank, its rank bound)``), exactly, from the SVD of the
    product computed from its factors (:func:`~lmerge.methods._products.product_svds`, on the
    factors brought to unit scale, :mod:`~lmerge.methods._unit_scale`): no dense product."""
    a, b = unit_scale([A]), unit_scale([B])
    svd = product_svds([B * b], [A * a])[0]
    k = min(rank, svd.S.numel())
    # The dropped singular values themselves: no difference of two nearly equal sums.
    squares = svd.S.double().square()
    total = float(squares.sum())
    error = float(squares[k:].sum() / total) ** 0.5 if total > 0 else 0.0
    return svd.Vh(k) / a, svd.U(k) * (svd.S[:k] / b), error


def balanced(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` with ``B' A' = B A`` exactly: each rank component's row of ``A`` and column of
    ``B`` scaled by reciprocal powers of two to about the same largest magnitude (their geometric
    mean), so that a float16 save (five exponent bits) holds factors whose product it holds, where
    a merge's factors may carry all of a component's magnitude on one side (an SVD's ``U S``).
    Balanced factors come back as they are (their exponents differ by at most one)."""
    largest_a, largest_b = A.abs().amax(dim=1), B.abs().amax(dim=0)
    shift = ((torch.frexp(largest_a)[1] - torch.frexp(largest_b)[1]) / 2).round()  # half to even
    shift = torch.where((largest_a > 0) & (largest_b > 0), shift, 0.0)  # a zero component stays as it is
    scale = torch.pow(2.0, shift.to(A.dtype))
    return A / scale[:, None], B * scale


def _relative_error(total: float, kept: float) -> float:
    """The relative Frobenius error of a projection that keeps ``kept`` of a matrix's squared norm
    ``total``: ``sqrt(total - kept) / sqrt(total)`` (0 for a zero matrix)."""
    return max(total - kept, 0.0) ** 0.5 / total**0.5 if total > 0 else 0.0


_METADATA = {"format": "pt"}
"""The safetensors metadata of a saved LoRA, as PEFT writes it."""


class LoraWriter:
    """Collects merged modules and writes a PEFT LoRA adapter whose scaling is 1 everywhere."""

    format = "lora"

    def __init__(self, adapters: list[LoraAdapter], rank: int | None, work: Path, svd_niter: int = 1) -> None:
        self.adapters = adapters
        self.dtype = saved_dtype(adapters)
        self.rank = rank or max(a.shapes[k].rank for a in adapters for k in a.module_keys)
        # A merge that comes as factors is saved as it is unless a lower rank was asked for.
        self.factor_rank = rank
        self.svd_niter = svd_niter
        # Each module's factors go to disk as they come (``work``: the bundle being built), after
        # room for the header of every module the adapters have, at the largest rank it can get.
        room = header_room(self._largest_factors(), _METADATA)
        self.tensors = StreamedTensors(work / WEIGHTS_FILE, root=work, room=room, metadata=_METADATA)
        self.ranks: dict[str, int] = {}
        self.svd_errors: dict[str, float] = {}

    def _largest_factors(self) -> dict[str, tuple[torch.dtype, list[int]]]:
        """Every module's factors at the largest rank a merge can give them: the adapters' ranks
        summed (a linear or low-rank merge) or the truncated SVD's rank (a dense one)."""
        largest = {}
        for key in dict.fromkeys(key for adapter in self.adapters for key in adapter.module_keys):
            shapes = [adapter.shapes[key] for adapter in self.adapters if key in adapter.shapes]
            rank = max(self.rank, sum(shape.rank for shape in shapes))
            largest[f"{PEFT_PREFIX}{key}.lora_A.weight"] = (self.dtype, [rank, shapes[0].in_features])
            largest[f"{PEFT_PREFIX}{key}.lora_B.weight"] = (self.dtype, [shapes[0].out_features, rank])
        return largest

    def prepare(self, module: MergedModule) -> MergedModule:
        """A dense merge replaced by its truncated SVD (an evaluation beside the save then scores
        what is saved), or factors of more than an asked-for rank truncated exactly; for a
        float16 save, :func:`balanced` (run in the merge's worker threads)."""
        if module.A is None:
            A, B, error = truncated_svd(module.delta, self.rank, self.svd_niter)
        elif self.factor_rank is not None and module.A.shape[0] > self.factor_rank:
            A, B, error = truncated_factors(module.A, module.B, self.factor_rank)
        else:
            A, B, error = module.A, module.B, module.svd_error
        if self.dtype == torch.float16:
            A, B = balanced(A, B)
        elif A is module.A:
            return module
        return dataclasses.replace(module, A=A, B=B, delta=None, svd_error=error)

    def add(self, module: MergedModule) -> None:
        module = self.prepare(module)
        A, B = module.A, module.B
        if module.svd_error is not None:
            self.svd_errors[module.key] = module.svd_error
        self.tensors.add(f"{PEFT_PREFIX}{module.key}.lora_A.weight", A.to(self.dtype))
        self.tensors.add(f"{PEFT_PREFIX}{module.key}.lora_B.weight", B.to(self.dtype))
        self.ranks[module.key] = A.shape[0]

    def write(self, out: Path) -> dict[str, Any]:
        rank = max(self.ranks.values())
        config = dict(self.adapters[0].config)
        odd = {key: r for key, r in self.ranks.items() if r != rank}
        config.update(
            r=rank,
            lora_alpha=rank,  # alpha == r everywhere: scaling 1, the factors carry everything
            rank_pattern=odd,
            alpha_pattern=dict(odd),
            use_rslora=False,
            target_modules=list(self.ranks),
            modules_to_save=None,
            layers_to_transform=None,
            layers_pattern=None,
            exclude_modules=None,
            inference_mode=True,
        )
        if config.get("task_type") in _HEAD_TASKS:
            # PEFT would demand one classifier inside the adapter; each task's head is in heads/.
            config["task_type"] = None
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        self.tensors.finish()
        files = [CONFIG_FILE, WEIGHTS_FILE, *write_heads(self.adapters, out)]
        info: dict[str, Any] = {"format": self.format, "rank": rank, "files": files}
        # 0 when every module is saved as merged (factor, linear and low-rank merges, dense ones in
        # core space, none of them truncated to save.rank).
        info["relative_error_max"] = max(self.svd_errors.values(), default=0.0)
        if self.svd_errors:
            info["svd_rank"] = self.rank
            info["svd_relative_error"] = self.svd_errors
            info["svd_relative_error_max"] = max(self.svd_errors.values())
        return info


class FullWriter:
    """Adds every merged module into the base model's weights and saves it with
    ``save_pretrained``; for tasks with their own heads, the backbone alone."""

    format = "full"

    def __init__(self, adapters: list[LoraAdapter], base_model: str | None) -> None:
        self.adapters = adapters
        self.base_model = base_model or adapters[0].base_model
        if not self.base_model:
            raise AdapterError(
                f"{adapters[0].path}: base_model_name_or_path is not set; give save.base_model for format full"
            )
        self.model, self.prefix = _load_base(self.base_model, adapters[0].task_type)

    def prepare(self, module: MergedModule) -> MergedModule:
        """The merge with its dense update built (run in the merge's worker threads)."""
        return module if module.delta is not None else dataclasses.replace(module, delta=module.dense())

    def add(self, module: MergedModule) -> None:
        name = module.key.removeprefix(self.prefix)
        try:
            target = self.model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"base model {self.base_model}: has no module {name!r}") from None
        delta = module.dense()
        if self.adapters[0].fan_in_fan_out:
            delta = delta.T
        with torch.no_grad():
            target.weight += delta.to(target.weight.dtype)

    def write(self, out: Path) -> dict[str, Any]:
        self.model.save_pretrained(out)
        heads = write_heads(self.adapters, out)
        return {"format": self.format, "base_model": self.base_model, "files": sorted(_files(out)), "heads": heads}


class NullWriter:
    """Saves nothing: the run bundle holds the metadata only."""

    format = "none"

    def prepare(self, module: MergedModule) -> MergedModule:
        return module

    def add(self, module: MergedModule) -> None:
        pass

    def write(self, out: Path) -> dict[str, Any]:
        return {"format": self.format, "files": []}


def write_heads(adapters: list[LoraAdapter], out: Path) -> list[str]:
    """Each adapter's task head as ``heads/<adapter>.safetensors``: the model's own head that PEFT
    saved (``modules_to_save``), or a pooled head (``task_head.*`` beside the adapter) with its JSON."""
    written = []
    for adapter in adapters:
        if has_head(adapter.path):
            head = read_head(adapter.path)
            (out / HEADS_DIR).mkdir(exist_ok=True)
            state = head.state
            paths = write_head(
                out / HEADS_DIR, head.pooling, head.label_names, state["weight"], state["bias"], adapter.name, root=out
            )
            written += [str(path.relative_to(out)) for path in paths]
            continue
        state = adapter.head_state()
        if not state:
            continue
        (out / HEADS_DIR).mkdir(exist_ok=True)
        relative = f"{HEADS_DIR}/{adapter.name}.safetensors"
        metadata = {"adapter": str(adapter.path), "modules_to_save": json.dumps(adapter.config["modules_to_save"])}
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / relative), metadata=metadata)
        written.append(relative)
    return written


def _load_base(path: str, task_type: str | None) -> tuple[torch.nn.Module, str]:
    import transformers

    from lmerge.tasks.models import trust_remote_code

    auto = getattr(transformers, _AUTO_CLASSES.get(task_type or "", "AutoModel"))
    # Its loading and shard-writing bars would come before a one-line error, or after the summary.
    transformers.utils.logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"base model {path!r}: cannot be loaded ({' '.join(str(exc).split())[:200]})") from None
    # Heads are per task: the backbone alone is saved and adapter keys lose the head model's prefix.
    prefix = f"{model.base_model_prefix}." if task_type in _HEAD_TASKS or auto is transformers.AutoModel else ""
    return model, prefix


def _files(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]


def writer_for(fmt: str, adapters: list[LoraAdapter], rank: int | None, base_model: str | None, work: Path):
    """The writer for save format ``fmt``, writing into ``work`` (the run bundle being built)."""
    builders = {
        "lora": lambda: LoraWriter(adapters, rank, work),
        "full": lambda: FullWriter(adapters, base_model),
        "none": NullWriter,
    }
    if fmt not in builders:
        raise OutputError(f"save.format: {fmt!r} is not one of {', '.join(builders)}")
    return builders[fmt]()
