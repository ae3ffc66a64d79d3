"""``run_merge``: the single entry point from a config to a merged, saved, recorded result."""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lmerge.adapters.align import align_keys, check_base, check_compatible
from lmerge.adapters.lora import LoraAdapter, first_nonfinite, product_within, saved_dtype
from lmerge.data import subset_namespace
from lmerge.errors import ConfigError, MethodError
from lmerge.evaluation.baseline_key import config_digest, package_version
from lmerge.evaluation.evaluate import Evaluation, Evaluator
from lmerge.evaluation.record import index_entry, plan_views, results_name
from lmerge.layers import layer_index
from lmerge.merge.config import MergeConfig
from lmerge.merge.engine import MergedModule, merge_modules, scaled_factors
from lmerge.merge.policies import build_policy, overridden_layers, policy_spec
from lmerge.merge.transforms import parse_transforms
from lmerge.merge.writers import writer_for
from lmerge.methods import MergeMethod, get_method
from lmerge.methods._lowrank import factor_norm
from lmerge.outputs import (
    check_folder,
    check_inputs_outside,
    check_output_root,
    merged_dir,
    run_bundle,
    safe_component,
    write_json_atomic,
)
from lmerge.tasks.resolve import resolve_adapters
from lmerge.tasks.spec import catalog_tasks

_PACKAGES = ("lmerge", "torch", "transformers", "peft", "safetensors")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
"""A string parameter value that names itself in a tag (``core``); others enter as a hash."""


@dataclass
class MergeResult:
    """What a merge produced: its identity, where its bundle is, and its metadata."""

    method: str
    params: dict[str, Any]
    tag: str
    run_dir: Path
    metadata: dict[str, Any] = field(repr=False)
    saved: dict[str, Any] = field(repr=False)
    evaluation: Evaluation | None = field(default=None, repr=False)


@dataclass
class PreparedMerge:
    """A merge config checked against its adapters: everything a merge needs before it runs."""

    method: MergeMethod
    adapters: list[LoraAdapter]
    params: dict[str, Any]
    lambda_fn: Callable[[str], float]
    transforms: list[Any]
    tag: str
    keys: list[str]
    dropped: dict[str, list[str]]
    unchecked: str | None

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]


def prepare_merge(config: MergeConfig) -> PreparedMerge:
    """Check the whole config against its adapters (method, parameters, lambda policy,
    transforms, tag, keys, layers, and the paths its evaluation will be written to) without
    writing anything. Raises :class:`lmerge.errors.LMergeError` on any bad input."""
    method = get_method(config.method)
    if config.save.format != "none" and not method.saveable:
        raise MethodError(f"method {method.name!r} cannot be saved; use save.format none")
    adapters = resolve_adapters(config.adapters, config.catalog)
    params = method.normalize_params(config.method_params, len(adapters))
    lambda_fn = build_policy(config.lambda_policy, method, params, given=config.method_params)
    transforms = parse_transforms(config.transforms)
    tag = (
        safe_component(config.tag, "tag")
        if config.tag
        else merge_tag(method, params, policy_spec(config.lambda_policy), config.transforms)
    )
    check_compatible(adapters)
    keys, dropped = align_keys(adapters, config.merge_mode)
    unchecked = check_base(adapters, config.save.base_model)
    _check_layers("lambda_policy.overrides", overridden_layers(config.lambda_policy), keys)
    _check_layers("method_params.layer_weights", set(params.get("layer_weights") or ()), keys)
    prepared = PreparedMerge(method, adapters, params, lambda_fn, transforms, tag, keys, dropped, unchecked)
    check_output_root(config.output_dir)
    check_inputs_outside(config.output_dir, [a.path for a in adapters])
    check_folder(config.output_dir, merged_dir(config.output_dir, method.name, prepared.names) / "runs")
    if config.eval_tasks:
        # The names the evaluation will be recorded under, checked before any work is done.
        planned = Evaluation(config.split, subset_namespace(config.eval_subset), dict.fromkeys(config.eval_tasks))
        plan_views(config.output_dir, method.name, prepared.names, tag, planned)
    return prepared


def check_settings(config: MergeConfig) -> None:
    """Check what of a merge config does not depend on its method parameters (transforms, lambda
    policy, tag, output root, adapters, evaluation settings and tasks), for a config whose
    parameters a learner has yet to find."""
    parse_transforms(config.transforms)
    policy_spec(config.lambda_policy)
    if config.tag:
        safe_component(config.tag, "tag")
    check_output_root(config.output_dir)
    adapters = resolve_adapters(config.adapters, config.catalog)
    check_inputs_outside(config.output_dir, [a.path for a in adapters])
    if config.eval_tasks or config.eval_harness:
        evaluator_for(config, adapters, baselines=False)


def merge_to_bundle(
    config: MergeConfig, evaluator: Evaluator | None = None, learned: dict[str, Any] | None = None
) -> MergeResult:
    """Check the config (:func:`prepare_merge`), transform, merge module by module, save, and
    commit the run bundle with its index entry (``learned``: how an optimizer found
    ``method_params``, for the metadata; :func:`lmerge.pipeline.run_merge` runs the optimizer).
    ``evaluator``: one already prepared for ``config.eval_tasks`` (a sweep reuses one, so the base
    model loads once); default: a new one when the config evaluates.
    Raises :class:`lmerge.errors.LMergeError` on any bad input."""
    started = time.perf_counter()
    merge = prepare_merge(config)
    method, adapters, params, names, root = merge.method, merge.adapters, merge.params, merge.names, config.output_dir
    scales = _transform_scales(adapters, merge.keys, merge.transforms)
    if evaluator is None and (config.eval_tasks or config.eval_harness):
        evaluator = evaluator_for(config, adapters)
    evaluation = None
    limit = _largest_saved(config.save.format, adapters)
    with run_bundle(root, method.name, names) as bundle:
        writer = writer_for(config.save.format, adapters, config.save.rank, config.save.base_model, bundle.work)
        writers = [writer] + ([evaluator.folder(adapters[0].fan_in_fan_out)] if evaluator else [])
        prepare = _checked(writer.prepare, limit)
        for module in merge_modules(adapters, merge.keys, method, params, merge.lambda_fn, scales, prepare):
            for each in writers:
                each.add(module)
        # After the merge: its reads have hashed the adapters' files on the way (the bundle needs
        # its id only when it is committed).
        run_id = bundle.run_id = _run_id(config, adapters, params, learned)
        saved = writer.write(bundle.work)
        meta = _metadata(config, method, params, merge.tag, adapters, merge.keys, merge.dropped, saved, started)
        meta.update(optimizer=learned, run_id=run_id)
        summary = _summary(meta)
        if evaluator:
            try:
                evaluation = evaluator.evaluate()
            finally:
                writers[1].restore()
            summary["evaluation"] = evaluation.to_dict()
            results = results_name(evaluation.split, evaluation.namespace)
            write_json_atomic(bundle.work / results, evaluation.to_dict(), root=root)
            views = plan_views(root, method.name, names, merge.tag, evaluation)
            bundle.record(
                views.index,
                lambda final: index_entry(views, meta, names, final, run_id, final / results),  # noqa: B023
                lambda _: views.write(),  # noqa: B023
            )
        write_json_atomic(bundle.work / "merge_metadata.json", meta, root=root)
        write_json_atomic(bundle.work / "summary.json", summary, root=root)
    if merge.unchecked:
        warnings.warn(merge.unchecked, stacklevel=2)  # after the merge: an error stays the only line
    return MergeResult(method.name, params, merge.tag, bundle.final, meta, saved, evaluation)


def _run_id(config: MergeConfig, adapters: list[LoraAdapter], params: dict[str, Any], learned: Any) -> str:
    """The run's identity across retries: a digest of its config, its adapters' weights and what
    a learner found (a killed run retried with the same command takes over its own index entry)."""
    identity = {
        "config": asdict(config),
        "adapters": [(a.name, a.sha256, config_digest(a.config)) for a in adapters],
        "params": params,
        "learned": learned,
    }
    return config_digest(identity)[:16]


def evaluator_for(config: MergeConfig, adapters: list[LoraAdapter], baselines: bool = True) -> Evaluator:
    """An evaluator for the config's ``eval_tasks`` and ``eval_harness`` (its settings checked),
    with the baselines computed (or read from the cache) unless ``baselines`` is false: each task's
    own adapter on its task, each of ``adapters`` on the harness tasks."""
    evaluator = Evaluator(
        catalog_tasks(config.catalog, config.eval_tasks) if config.eval_tasks else [],
        config.split,
        output_root=config.output_dir,
        eval_subset=config.eval_subset,
        batch_size=config.eval_batch_size,
        base_model=config.save.base_model or adapters[0].base_model,
        precision=config.eval_precision,
        harness=config.eval_harness,
    )
    if baselines:
        evaluator.prepare_baselines(adapters)
    return evaluator


def merge_tag(
    method: MergeMethod,
    params: dict[str, Any],
    lambda_policy: dict[str, Any] | None = None,
    transforms: list[Any] | None = None,
) -> str:
    """A readable, stable name for a merge: the method and the parameters that differ from
    its defaults (``ties_k=50.0``, ``ties_space=core``); list-valued parameters and other
    strings enter as a short hash, as do a lambda policy other than the method's own lambda
    everywhere and any transforms (so that different merges get different names)."""
    params = dict(params)
    if lambda_policy and lambda_policy.get("type") == "scalar" and lambda_policy.get("value") is not None:
        params[method.lambda_param] = float(lambda_policy["value"])  # the lambda the merge used
        lambda_policy = None
    extras = {"lambda_policy": lambda_policy if lambda_policy and lambda_policy != {"type": "scalar"} else None}
    extras["transforms"] = transforms or None
    parts = [method.name]
    for name, value in [*sorted(params.items()), *extras.items()]:
        if name in method.defaults and value == method.defaults[name] or name in extras and value is None:
            continue
        if isinstance(value, bool | int | float) or value is None or _WORD.fullmatch(str(value)):
            parts.append(f"{name}={value}")
        else:
            parts.append(f"{name}={config_digest(value)[:8]}")
    return "_".join(parts)


def _check_layers(where: str, named: set[int], keys: list[str]) -> None:
    """Refuse per-layer settings for layers that no merged module has."""
    layers = {layer_index(k) for k in keys} - {None}
    missing = sorted(named - layers)
    if missing:
        span = f"{min(layers)}-{max(layers)}" if layers else "none"
        raise ConfigError(f"{where}: layer {missing[0]} is not in the adapters (layers {span})")


def _largest_saved(fmt: str, adapters: list[LoraAdapter]) -> float:
    """The largest magnitude the merge can be saved with: a LoRA is saved in the adapters' widest
    dtype (float16's is 65504), full weights in float32."""
    dtype = saved_dtype(adapters) if fmt == "lora" else torch.float32
    return float(torch.finfo(dtype).max)


def _checked(prepare: Callable[[MergedModule], MergedModule], limit: float) -> Callable[[MergedModule], MergedModule]:
    """The writer's per-module step with the merge checked before it (a NaN would stop an SVD)
    and after it against ``limit``, in the merge's worker threads."""

    def run(module: MergedModule) -> MergedModule:
        _check_finite(module, math.inf)
        return _check_finite(prepare(module), limit)

    return run


def _check_finite(module: MergedModule, limit: float) -> MergedModule:
    """``module``, unless it holds NaN/Inf or numbers beyond ``limit`` (one batched reduction),
    or its factors' product, the update a LoRA applies, does."""
    tensors = [t for t in (module.A, module.B, module.delta) if t is not None]
    if first_nonfinite(tensors, limit) is not None or (
        math.isfinite(limit) and module.A is not None and not product_within(module.A, module.B, limit)
    ):
        bound = "NaN or Inf" if math.isinf(limit) else f"NaN, Inf or beyond {limit:.4g}, the range it is saved in"
        raise MethodError(f"merged module {module.key}: the result overflows ({bound}); lower lambda or the weights")
    return module


def _transform_scales(adapters: list[LoraAdapter], keys: list[str], transforms) -> dict[tuple[int, str], float]:
    scales: dict[tuple[int, str], float] = {}
    for transform, params in transforms:
        norms = {}
        if transform.needs_norms:
            for key in keys:
                As, Bs = scaled_factors(adapters, key, scales)
                norms.update({(i, key): factor_norm(A, B) for i, (A, B) in enumerate(zip(As, Bs, strict=True))})
        # Transforms compose: each multiplies the factors the previous ones left.
        for index, factor in transform.fn(norms, len(adapters), keys, params).items():
            scales[index] = scales.get(index, 1.0) * factor
    return scales


def _versions() -> dict[str, str]:
    return {package: package_version(package) for package in _PACKAGES}


def _metadata(config, method, params, tag, adapters, keys, dropped, saved, started) -> dict[str, Any]:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method.name,
        "kind": method.kind.value,
        "tag": tag,
        "params": params,
        "method_params": config.method_params,
        "lambda_policy": policy_spec(config.lambda_policy),
        "transforms": config.transforms,
        "merge_mode": config.merge_mode,
        "adapters": [
            {
                "name": a.name,
                "path": str(a.path.resolve()),
                "sha256": a.sha256,
                "base_model": a.base_model,
                "task_type": a.task_type,
                "ranks": sorted({s.rank for s in a.shapes.values()}),
            }
            for a in adapters
        ],
        "modules": len(keys),
        "dropped_keys": dropped,
        "save": {**asdict(config.save), **saved},
        "versions": _versions(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _summary(meta: dict[str, Any]) -> dict[str, Any]:
    save = meta["save"]
    summary = {key: meta[key] for key in ("created", "method", "tag", "params", "merge_mode", "modules")}
    summary["adapters"] = [a["name"] for a in meta["adapters"]]
    summary["saved"] = {"format": save["format"], "files": save["files"]}
    for key in ("rank", "relative_error_max", "svd_relative_error_max"):
        if key in save:
            summary["saved"][key] = save[key]
    return summary
