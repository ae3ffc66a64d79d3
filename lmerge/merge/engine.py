"""The streaming merge engine: one module at a time, through the method's kind.

Only dense methods in weight space ever build dense task vectors, for the module at hand and a
block of rows at a time (:class:`~lmerge.methods._task_vectors.TaskVectors`), so peak memory stays
below one module's deltas for all adapters plus the output. Low-rank methods and dense methods in
core space work on the factors and ``R x R`` cores (:mod:`lmerge.methods._lowrank`).

Low-rank merges keep their scratch buffers from one module to the next in each thread
(:mod:`lmerge.methods._scratch`); dense merges in weight space give theirs back after each module.

Modules are merged by a pool of threads, one module each, with torch's own intra-op threads set
to one meanwhile: a dense merge is hundreds of elementwise calls on cache-sized blocks, and
spreading each call over cores costs a thread wake-up per call (with ``OMP_WAIT_POLICY=PASSIVE``
more than the call's work), where whole modules side by side keep every core busy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lmerge.adapters.lora import LoraAdapter, module_factors
from lmerge.layers import layer_index
from lmerge.merge.policies import LambdaFn
from lmerge.methods._lowrank import CoreSpace
from lmerge.methods._scratch import release as release_scratch
from lmerge.methods._task_vectors import TaskVectors
from lmerge.methods._unit_scale import unit_scale
from lmerge.methods.registry import Kind, MergeMethod, ModuleContext, Space


@dataclass
class MergedModule:
    """The merge of one module: LoRA factors with scaling 1 (``A`` [R, in], ``B`` [out, R])
    or a dense delta [out, in]; a LoRA writer's ``prepare`` replaces a delta with its truncated
    SVD, which is then the merge (``svd_error``: its relative Frobenius error)."""

    key: str
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    svd_error: float | None = None

    def dense(self) -> torch.Tensor:
        """The module's weight update ``B @ A`` (or the dense delta itself)."""
        return self.delta if self.delta is not None else self.B @ self.A


def _combine_factors(method: MergeMethod, As, Bs, params, ctx) -> MergedModule:
    A, B = method.fn(As, Bs, params, ctx)
    return MergedModule(ctx.key, A=A, B=B)


def _combine_linear(method: MergeMethod, As, Bs, params, ctx) -> MergedModule:
    # sum_i c_i B_i A_i == [c_1 B_1 ... c_n B_n] @ [A_1; ...; A_n]: exact, rank sum(r_i).
    coefficients = method.fn(len(As), params, ctx)
    B = torch.cat([c * B for c, B in zip(coefficients, Bs, strict=True)], dim=1)
    return MergedModule(ctx.key, A=torch.cat(As, dim=0), B=B)


def _at_unit_scale(combine: Callable[..., MergedModule]) -> Callable[..., MergedModule]:
    """``combine`` on the factors brought to unit scale by powers of two, its merged factors scaled
    back (:mod:`lmerge.methods._unit_scale`): for the routes that square the factor stacks."""

    def run(method: MergeMethod, As, Bs, params, ctx) -> MergedModule:
        a, b = unit_scale(As), unit_scale(Bs)
        if a == b == 1.0:
            return combine(method, As, Bs, params, ctx)
        # The factors are fresh tensors, this merge's own (scaled_factors).
        torch._foreach_mul_(As, a)
        torch._foreach_mul_(Bs, b)
        module = combine(method, As, Bs, params, ctx)
        return MergedModule(module.key, A=module.A / a, B=module.B / b)

    return run


def _dense_in_weight_space(method: MergeMethod, As, Bs, params, ctx) -> MergedModule:
    delta = method.fn(TaskVectors.from_factors(As, Bs), params, ctx)
    # Its scratch buffers served many blocks; their memory goes to the next [out, in] results.
    release_scratch()
    return MergedModule(ctx.key, delta=delta)


def _dense_in_core_space(method: MergeMethod, As, Bs, params, ctx) -> MergedModule:
    # Core Space merging: delta_i = U M_i V^T with U, V the singular vectors of the factor stacks,
    # so the method runs on the R x R cores M_i and U M V^T is an exact LoRA.
    space = CoreSpace(As, Bs)
    Pb, Pa = space.singular_bases()
    merged = method.fn(space.cores(Pb, Pa), params, ctx)
    A, B = space.lift_core(merged, Pb, Pa)
    return MergedModule(ctx.key, A=A, B=B)


DENSE_SPACES: dict[Space, Callable[..., MergedModule]] = {
    Space.WEIGHT: _dense_in_weight_space,
    Space.CORE: _at_unit_scale(_dense_in_core_space),
}


def _combine_dense(method: MergeMethod, As, Bs, params, ctx) -> MergedModule:
    return DENSE_SPACES[Space(params["space"])](method, As, Bs, params, ctx)


def _combine_low_rank(method: MergeMethod, As, Bs, params, ctx) -> MergedModule:
    A, B = method.fn(As, Bs, params, ctx)
    bound = sum(A_i.shape[0] for A_i in As)
    if A.shape[0] > bound:  # the kind's contract, which the writers rely on to save it as it is
        raise RuntimeError(f"method {method.name!r} returned rank {A.shape[0]} > {bound} for {ctx.key}")
    return MergedModule(ctx.key, A=A, B=B)


COMBINERS: dict[Kind, Callable[..., MergedModule]] = {
    Kind.FACTORS: _combine_factors,
    Kind.LINEAR: _combine_linear,
    Kind.DENSE: _combine_dense,
    Kind.LOW_RANK: _at_unit_scale(_combine_low_rank),
}


def scaled_factors(
    adapters: list[LoraAdapter], key: str, scales: Mapping[tuple[int, str], float] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each adapter's ``A`` and ``B`` for ``key`` (fresh tensors), with its scaling (and transform
    factor) in ``B``."""
    As, Bs = module_factors(adapters, key)
    for i, (adapter, B) in enumerate(zip(adapters, Bs, strict=True)):
        B.mul_(adapter.scaling(key) * (scales or {}).get((i, key), 1.0))
    return As, Bs


def merge_modules(
    adapters: list[LoraAdapter],
    keys: list[str],
    method: MergeMethod,
    params: dict[str, Any],
    lambda_fn: LambdaFn,
    scales: Mapping[tuple[int, str], float] | None = None,
    prepare: Callable[[MergedModule], MergedModule] | None = None,
    workers: int | None = None,
) -> Iterator[MergedModule]:
    """Merge ``keys`` one module at a time, yielded in order.

    ``prepare`` runs on each merged module in the same worker (a writer's per-module work, such
    as the truncated SVD of a dense merge). ``workers``: threads merging modules side by side
    (default: torch's thread count). Each adapter's weights file is opened once for the whole
    merge (a descriptor, nothing mapped: no page read stays resident) and read in its own order.
    """
    combine = COMBINERS[method.kind]

    def job(key: str, As: list[torch.Tensor], Bs: list[torch.Tensor]) -> MergedModule:
        layer = layer_index(key)
        with torch.no_grad():  # grad mode is per thread
            module = combine(method, As, Bs, params, ModuleContext(key=key, layer=layer, lam=lambda_fn(layer)))
            return prepare(module) if prepare else module

    def loaded() -> Iterator[tuple[str, list[torch.Tensor], list[torch.Tensor]]]:
        with ExitStack() as files:
            for adapter in adapters:
                files.enter_context(adapter.reading())
            for key in keys:
                As, Bs = scaled_factors(adapters, key, scales)
                yield key, As, Bs

    workers = workers or torch.get_num_threads()
    if workers == 1 or len(keys) == 1:
        try:
            for args in loaded():
                yield job(*args)
        finally:
            release_scratch()
        return
    with _single_threaded_ops():
        pool = ThreadPoolExecutor(workers, thread_name_prefix="lmerge-merge")
        try:
            # At most two modules per worker in flight: memory stays bounded, and while this
            # thread reads the next module's factors or the caller writes a merged one, every
            # worker still has a module queued (with one each, they wait on this thread's I/O).
            pending: deque[Future[MergedModule]] = deque()
            for args in loaded():
                pending.append(pool.submit(job, *args))
                if len(pending) == 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(cancel_futures=True)


@contextmanager
def _single_threaded_ops() -> Iterator[None]:
    """torch's intra-op threads set to one, and back. Threads started meanwhile keep one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
