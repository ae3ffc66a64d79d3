"""The ``lmerge`` command: one verb per job.

Verbs are plain typed functions handed to jsonargparse, so each signature is its CLI and
each docstring its help. Every bad input ends in one line on stderr and exit code 2; pass
``--debug`` anywhere for the traceback instead.
"""

from __future__ import annotations

import inspect
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml

from lmerge.demo import demo
from lmerge.errors import ConfigError, LMergeError
from lmerge.lightning_cli import LIGHTNING_VERBS, lightning
from lmerge.merge.config import MergeConfig, SaveConfig, load_merge_config, migrate_legacy
from lmerge.methods import METHODS
from lmerge.outputs import DEFAULT_OUTPUT_DIR
from lmerge.pipeline import run_merge
from lmerge.sweep.search import SearchConfig
from lmerge.yaml_files import read_yaml


def merge(
    adapters: list[str],
    method: str,
    merge_mode: Literal["common", "strict"] = "common",
    method_params: dict[str, Any] | None = None,
    transforms: list[Any] | None = None,
    lambda_policy: str | dict[str, Any] = "scalar",
    save: SaveConfig = SaveConfig(),  # noqa: B008 - jsonargparse reads the default's fields
    output_dir: str = DEFAULT_OUTPUT_DIR,
    catalog: str | None = None,
    tag: str | None = None,
    optimizer: str | dict[str, Any] | None = None,
    eval_tasks: list[str] | None = None,
    split: str = "test",
    eval_subset: dict[str, Any] | None = None,
    eval_batch_size: int = 32,
    eval_precision: str = "32-true",
    search: dict[str, Any] | None = None,
) -> None:
    """Merge LoRA adapters into one and write a run bundle (and the merged adapter).

    Args:
        adapters: Adapter directories or task names from the catalog, e.g. [sentiment, question].
        method: Merge method: {methods}.
        merge_mode: common merges the modules all adapters share; strict fails on any difference.
        method_params: The method's parameters, e.g. --method_params.k 20; each method's, with
            defaults: {params}.
        transforms: Pre-merge transforms, e.g. [{{name: layer_l2_normalize, params: {{target_norm: 1.0}}}}].
        lambda_policy: scalar, or {{type: per_layer, default: 0.5, overrides: {{0: 0.2}}}}.
        save: How to save the merge (format lora, full or none; rank for dense methods).
        output_dir: Root of all outputs.
        catalog: Task catalog YAML that maps task names to adapters.
        tag: Name of this merge in outputs; default: the method and its parameters.
        optimizer: Learn the weighted_delta_n coefficients first: {{name: adamerging, params: {{max_steps: 100}}}}
            (also gradient, supermerge, regret_smoothmax; params: learner, trainer and data settings).
        eval_tasks: Catalog tasks to evaluate the merge on, next to each task's own adapter.
        split: Split to evaluate on.
        eval_subset: Evaluate on a deterministic subset, e.g. {{enabled: true, max_samples: 500}}.
        eval_batch_size: Batch size of evaluation.
        eval_precision: 32-true, or bf16-mixed / 16-mixed (autocast on a GPU; CPU stays in float32).
        search: For optimizer bayes: the search space and budget, as in a sweep config's search.
    """
    config = MergeConfig(
        adapters=adapters,
        method=method,
        merge_mode=merge_mode,
        method_params=method_params or {},
        transforms=transforms or [],
        lambda_policy=lambda_policy,
        save=save,
        output_dir=output_dir,
        catalog=catalog,
        tag=tag,
        optimizer=optimizer,
        eval_tasks=eval_tasks,
        split=split,
        eval_subset=eval_subset,
        eval_batch_size=eval_batch_size,
        eval_precision=eval_precision,
        search=search,
    )
    result = run_merge(config)
    meta = result.metadata
    for name, keys in meta["dropped_keys"].items():
        _note(f"merge_mode common: left out {len(keys)} module(s) only {name!r} has, e.g. {keys[0]}")
    saved = result.saved
    detail = f"saved {saved['format']}"
    if "rank" in saved:
        detail += f" rank {saved['rank']}"
    if "svd_relative_error_max" in saved:
        detail += f" (max relative SVD error {saved['svd_relative_error_max']:.3g})"
    print(f"merged {len(meta['adapters'])} adapters with {result.tag} over {meta['modules']} modules; {detail}")
    if result.evaluation:
        print(result.evaluation.table())
    print(f"run bundle: {result.run_dir}")


def sweep(
    adapters: list[str],
    method: str,
    merge_mode: Literal["common", "strict"] = "common",
    method_params: dict[str, Any] | None = None,
    transforms: list[Any] | None = None,
    lambda_policy: str | dict[str, Any] = "scalar",
    save: SaveConfig = SaveConfig(),  # noqa: B008 - jsonargparse reads the default's fields
    output_dir: str = DEFAULT_OUTPUT_DIR,
    catalog: str | None = None,
    optimizer: str | dict[str, Any] | None = None,
    eval_tasks: list[str] | None = None,
    split: str = "test",
    eval_subset: dict[str, Any] | None = None,
    eval_batch_size: int = 32,
    eval_precision: str = "32-true",
    search: SearchConfig = SearchConfig(),  # noqa: B008 - jsonargparse reads the default's fields
    constraint_nonnegative: bool = False,
    save_merged: bool = False,
    storage: str | None = None,
) -> None:
    """Search a merge's parameters (grid or Bayesian), ranking points by their worst interference delta.

    Re-running the same command resumes the sweep; several processes given the same config (and
    --storage for several machines) share its points.

    Args:
        adapters: Adapter directories or task names from the catalog.
        method: Merge method whose parameters are searched.
        merge_mode: common merges the modules all adapters share; strict fails on any difference.
        method_params: Parameters held fixed; the searched ones come from search.
        transforms: Pre-merge transforms.
        lambda_policy: scalar, or {type: per_layer, default: 0.5, overrides: {0: 0.2}}.
        save: How points are saved when save_merged is set.
        output_dir: Root of all outputs.
        catalog: Task catalog YAML that maps task names to adapters and data.
        optimizer: none (a sweep searches the parameters itself).
        eval_tasks: Catalog tasks each point is evaluated on; default: the adapters.
        split: Split to evaluate on.
        eval_subset: Evaluate on a deterministic subset, e.g. {enabled: true, max_samples: 500}.
        eval_batch_size: Batch size of evaluation.
        eval_precision: 32-true, or bf16-mixed / 16-mixed (autocast on a GPU; CPU stays in float32).
        search: What to try, e.g. --search.type grid --search.grid.lambda [0.1,0.3].
        constraint_nonnegative: Keep the method's lambda-like parameter >= 0.
        save_merged: Save every point's merge; default: evaluate in memory only.
        storage: Optuna storage shared by several machines (sqlite:///..., postgresql://...);
            default: a journal file in the sweep directory.
    """
    from lmerge.sweep import SweepConfig, run_sweep

    config = SweepConfig(
        adapters=adapters,
        method=method,
        merge_mode=merge_mode,
        method_params=method_params or {},
        transforms=transforms or [],
        lambda_policy=lambda_policy,
        save=save,
        output_dir=output_dir,
        catalog=catalog,
        optimizer=optimizer,
        eval_tasks=eval_tasks,
        split=split,
        eval_subset=eval_subset,
        eval_batch_size=eval_batch_size,
        eval_precision=eval_precision,
        search=search,
        constraint_nonnegative=constraint_nonnegative,
        save_merged=save_merged,
        storage=storage,
    )
    result = run_sweep(config)
    print(result.table())
    if result.best:
        print(f"\nbest: {result.best['tag']}  score {result.best['score']:+.4f}  (config: {result.best_config})")
        print(result.best_config.read_text(), end="")
    print(f"sweep: {result.path}")


def evaluate(
    eval_tasks: list[str],
    catalog: str,
    adapter: str | None = None,
    merge_config: str | None = None,
    split: str = "test",
    eval_subset: dict[str, Any] | None = None,
    eval_batch_size: int = 32,
    eval_precision: str = "32-true",
    output_dir: str = DEFAULT_OUTPUT_DIR,
    tag: str | None = None,
) -> None:
    """Evaluate a saved merged adapter, a merge config, or (with neither) each task's own adapter alone.

    Args:
        eval_tasks: Catalog tasks to evaluate on.
        catalog: Task catalog YAML (task name -> adapter and data).
        adapter: A saved merged adapter: an lmerge run bundle or any PEFT LoRA directory.
        merge_config: A merge config to run in memory (not saved) and evaluate.
        split: Split to evaluate on.
        eval_subset: Evaluate on a deterministic subset, e.g. {enabled: true, max_samples: 500}.
        eval_batch_size: Batch size of evaluation.
        eval_precision: 32-true, or bf16-mixed / 16-mixed (autocast on a GPU; CPU stays in float32).
        output_dir: Root of all outputs.
        tag: Name of the evaluated merge in outputs; default: the run bundle's tag or the directory name.
    """
    from lmerge.evaluation.evaluate import Evaluator
    from lmerge.evaluation.saved import evaluate_saved_adapter
    from lmerge.tasks.spec import catalog_tasks

    if adapter and merge_config:
        raise ConfigError("evaluate: give --adapter or --merge_config, not both")
    if merge_config:
        settings = {"eval_tasks": eval_tasks, "catalog": catalog, "split": split, "output_dir": output_dir}
        settings.update(eval_subset=eval_subset, eval_batch_size=eval_batch_size, eval_precision=eval_precision)
        settings["save"] = SaveConfig(format="none")
        result = run_merge(load_merge_config(merge_config, **settings, **({"tag": tag} if tag else {})))
        print(result.evaluation.table())
        print(f"run bundle: {result.run_dir}")
        return
    evaluator = Evaluator(
        catalog_tasks(catalog, eval_tasks),
        split,
        output_root=output_dir,
        eval_subset=eval_subset,
        batch_size=eval_batch_size,
        precision=eval_precision,
    )
    if adapter:
        saved = evaluate_saved_adapter(adapter, evaluator, output_dir, tag)
        print(saved.evaluation.table())
        print(f"results: {saved.recorded['results_file']}")
        return
    evaluator.prepare_baselines()
    for task in evaluator.tasks:
        record = evaluator.baseline(task)
        print(f"{task.name}: {record['metric']} {record['value']:.4f} on {record['examples']} examples ({split})")


def _method_help() -> dict[str, str]:
    ordered = sorted(METHODS.values(), key=lambda m: (m.kind.value, m.name))
    methods = "; ".join(f"{m.name} ({m.kind.value}): {m.description.rstrip('.')}" for m in ordered)
    params = "; ".join(
        f"{m.name}: " + (", ".join(f"{k}={m.defaults.get(k, 'required')}" for k in m.param_names) or "none")
        for m in ordered
    )
    return {"methods": methods, "params": params}


merge.__doc__ = merge.__doc__.format(**_method_help())

VERBS = {"merge": merge, "sweep": sweep, "evaluate": evaluate, "demo": demo}


def _note(message: str) -> None:
    print(f"lmerge: note: {message}", file=sys.stderr)


_default_show_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    # Our own warnings in one line; other packages' in their usual form.
    if "lmerge" in Path(filename).parts:
        print(f"lmerge: {category.__name__}: {message}", file=sys.stderr)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


def expand_args(argv: list[str]) -> list[str]:
    """Read every ``--config FILE`` ourselves (legacy keys migrated, unknown keys named with
    the file) and hand jsonargparse the result; map the legacy ``--lambda`` flag."""
    if not argv or argv[0] not in VERBS:
        return argv
    accepted = set(inspect.signature(VERBS[argv[0]]).parameters)
    out = [argv[0]]
    rest = iter(argv[1:])
    for arg in rest:
        name, _, inline = arg.partition("=")
        if name in ("--config", "--lambda"):
            value = inline or next(rest, None)
            if value is None:
                raise ConfigError(f"{name}: expects a value")
            if name == "--lambda":
                warnings.warn("--lambda is deprecated; use --method_params.lambda", DeprecationWarning, stacklevel=2)
                out += ["--method_params.lambda", value]
                continue
            data = migrate_legacy(read_yaml(value), value)
            unknown = sorted(set(data) - accepted)
            if unknown:
                valid = ", ".join(sorted(accepted))
                raise ConfigError(f"{value}: {unknown[0]}: unknown key for lmerge {argv[0]} (valid: {valid})")
            out += ["--config", yaml.safe_dump(data, default_flow_style=True, width=1 << 30)]
        else:
            out.append(arg)
    return out


def _argument_message(exc: Exception) -> str:
    """jsonargparse's message on one line; its long union-type report cut to the key and the
    complaint about the first type that is not None (for ``X | None``: the one about X)."""
    text = str(exc)
    union = re.match(r'Parser key "(?P<key>[^"]+)":\s+Does not validate against any of the Union', text)
    if not union:
        return " ".join(text.split())
    listed = text.partition("Errors:")[2].partition("\n  Given value type:")[0]
    complaints = [" ".join(c.split()) for c in re.split(r"\n    - ", listed)[1:]]
    complaint = next((c for c in complaints if c != "Expected a <class 'NoneType'>"), None)
    value = " ".join(text.rpartition("Given value:")[2].split())
    if complaint is None:
        return f"{union['key']}: invalid value {value}"
    # A nested union is cut the same way; a nested parser's 'Parser key "x": ...' reads as 'x: ...'.
    complaint = re.sub(
        r'Parser key "([^"]+)": Does not validate .*Given value: (.*)$', r"\1: invalid value \2", complaint
    )
    complaint = re.sub(r'Parser key "([^"]+)":', r"\1:", complaint)
    if "value" not in complaint and not value.startswith(("NestedArg(", "Namespace(")):
        complaint += f", got {value}"
    return f"{union['key']}: {complaint}"


def overview() -> str:
    """``lmerge --help``: every verb with its one-line purpose."""
    verbs = {
        "merge": merge.__doc__.strip().splitlines()[0],
        "sweep": sweep.__doc__.strip().splitlines()[0],
        "evaluate": evaluate.__doc__.strip().splitlines()[0],
        "demo": demo.__doc__.strip().splitlines()[0],
        "fit": "Learn merge coefficients (AdaMerging, gradient, SuperMerge, regret smooth-max) or fine-tune a LoRA.",
        "validate": "Run a learner's validation loop (LightningCLI).",
        "test": "Run a learner's test loop (LightningCLI).",
    }
    lines = ["usage: lmerge VERB [options]   (lmerge VERB --help for its options; --debug shows tracebacks)", ""]
    lines += [f"  {verb:<9} {text}" for verb, text in verbs.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the ``lmerge`` command; returns the exit code."""
    from jsonargparse import CLI, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    warnings.showwarning = _show_warning
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"lmerge(\.|$)")
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0
    try:
        if argv[0] in LIGHTNING_VERBS:
            lightning(argv)
            return 0
        CLI(VERBS, args=expand_args(argv), as_positional=False, exit_on_error=False)
    except LMergeError as exc:
        if debug:
            raise
        print(f"lmerge: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from argparse import ArgumentError

        # LightningCLI's parser wraps an error raised while building the model or data in its own.
        cause = _lmerge_cause(exc)
        if debug or not (cause or isinstance(exc, ArgumentError)):
            raise
        print(f"lmerge: error: {cause or _argument_message(exc)}", file=sys.stderr)
        return 2
    return 0


def _lmerge_cause(exc: BaseException) -> LMergeError | None:
    """The LMergeError that ``exc`` was raised from, if any."""
    while exc is not None and not isinstance(exc, LMergeError):
        exc = exc.__cause__ or exc.__context__
    return exc


if __name__ == "__main__":
    sys.exit(main())
