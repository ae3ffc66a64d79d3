"""The ``lmerge`` command: one verb per job.

``merge`` and ``sweep`` take their config dataclass (:class:`lmerge.merge.config.MergeConfig`,
:class:`lmerge.sweep.config.SweepConfig`): its fields are the verb's flags and the keys of its
``--config`` file, their docstrings its help, and the verb gets the built config. ``evaluate`` and
``demo`` are plain typed functions whose signature is their CLI; ``fit``, ``validate`` and ``test``
are LightningCLI. Every bad input ends in one line on stderr and exit code 2; pass ``--debug``
anywhere for the traceback instead.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import textwrap
import warnings
from argparse import ArgumentError
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    get_loader,
    set_loader,
    set_parsing_settings,
)

from lmerge import console
from lmerge.adapters.lora import LoraAdapter
from lmerge.demo import demo
from lmerge.errors import ConfigError, LMergeError, did_you_mean
from lmerge.evaluation.evaluate import Evaluator
from lmerge.evaluation.harness import HarnessConfig
from lmerge.evaluation.saved import evaluate_saved_adapter
from lmerge.lightning_cli import LIGHTNING_VERBS, lightning
from lmerge.merge.config import MergeConfig, SaveConfig, config_section, load_merge_config, migrate_legacy
from lmerge.methods import METHODS
from lmerge.outputs import DEFAULT_OUTPUT_DIR, os_error_line, removed_if_left_empty
from lmerge.pipeline import run_merge
from lmerge.sweep.config import SweepConfig
from lmerge.tasks.spec import catalog_tasks
from lmerge.yaml_files import read_yaml, strict_loader

# jsonargparse's own YAML loader, which lmerge's strict reader checks every value before.
_JSONARGPARSE_YAML = get_loader("yaml")


def merge(config: MergeConfig) -> None:
    """Merge LoRA adapters into one and write a run bundle (and the merged adapter)."""
    result = run_merge(config)
    meta = result.metadata
    for name, keys in meta["dropped_keys"].items():
        _note(
            f"merge_mode common: left out {len(keys)} module(s) of {name!r} that not every adapter has, e.g. {keys[0]}"
        )
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


def sweep(config: SweepConfig) -> None:
    """Search a merge's parameters (grid or Bayesian), ranking points by their worst interference delta.

    Re-running the same command resumes the sweep; several processes given the same config (and
    --storage for several machines) share its points.
    """
    # Optuna loads only when a sweep runs.
    from lmerge.sweep.run import run_sweep

    result = run_sweep(config)
    print(result.table())
    if result.best:
        print(f"\nbest: {result.best['tag']}  score {result.best['score']:+.4f}  (config: {result.best_config})")
        print(result.best_config.read_text(), end="")
    print(f"sweep: {result.path}")


def evaluate(
    eval_tasks: list[str] | None = None,
    catalog: str | None = None,
    adapter: str | None = None,
    merge_config: str | None = None,
    split: str = "test",
    eval_subset: dict[str, Any] | None = None,
    eval_batch_size: int = 32,
    eval_precision: str = "32-true",
    eval_harness: HarnessConfig | None = None,
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
        eval_precision: 32-true, or bf16-mixed / 16-mixed (autocast; on a CPU, bf16 is faster where it computes
            bf16 natively).
        eval_harness: lm-evaluation-harness tasks to evaluate on too, e.g. --eval_harness.tasks [arc_easy]
            (the fields of a merge config's eval_harness).
        output_dir: Root of all outputs.
        tag: Name of the evaluated merge in outputs; default: the run bundle's tag or the directory name.
    """
    if adapter and merge_config:
        raise ConfigError("evaluate: give --adapter or --merge_config, not both")
    if eval_harness is not None:
        eval_harness = config_section(HarnessConfig, eval_harness, "eval_harness")
    if not eval_tasks and eval_harness is None:
        raise ConfigError("evaluate: give --eval_tasks (with --catalog), --eval_harness.tasks, or both")
    if not eval_tasks and not (adapter or merge_config):
        raise ConfigError("evaluate: --eval_harness alone scores a merge: give --adapter or --merge_config")
    if merge_config:
        settings = {"eval_tasks": eval_tasks, "catalog": catalog, "split": split, "output_dir": output_dir}
        settings.update(eval_subset=eval_subset, eval_batch_size=eval_batch_size, eval_precision=eval_precision)
        settings.update(eval_harness=eval_harness, save=SaveConfig(format="none"))
        result = run_merge(load_merge_config(merge_config, **settings, **({"tag": tag} if tag else {})))
        print(result.evaluation.table())
        print(f"run bundle: {result.run_dir}")
        return
    evaluator = Evaluator(
        catalog_tasks(catalog, eval_tasks) if eval_tasks else [],
        split,
        output_root=output_dir,
        eval_subset=eval_subset,
        batch_size=eval_batch_size,
        base_model=LoraAdapter(adapter).base_model if adapter and not eval_tasks else None,
        precision=eval_precision,
        harness=eval_harness,
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
    for name, scores in evaluator.harness_baselines().items():
        for task, score in scores.items():
            metric, value, _ = score.primary(task, eval_harness.metrics.get(task))
            print(f"{name} on {task}: {metric} {value:.4f} on {score.examples} examples (lm-evaluation-harness)")


def method_table() -> str:
    """Every registered method by kind, with its parameters and their defaults: the epilog of
    ``lmerge merge --help`` and ``lmerge sweep --help``, read from the registry when the parser is built."""
    lines = ["methods (--method) by kind, and their parameters (--method_params.NAME) with defaults:"]
    for method in sorted(METHODS.values(), key=lambda m: (m.kind.value, m.name)):
        params = ", ".join(f"{k}={method.defaults.get(k, 'required')}" for k in method.param_names)
        lines.append(_wrap(f"{method.name} ({method.kind.value}): {method.description}", "  ", "      "))
        lines.append(_wrap(f"parameters: {params or 'none'}", "      ", "        "))
    return "\n".join(lines)


def _wrap(text: str, first: str, rest: str) -> str:
    return textwrap.fill(text, width=100, initial_indent=first, subsequent_indent=rest)


@dataclass(frozen=True)
class Verb:
    """A verb of the command. With a ``schema`` (a config dataclass) its flags are the schema's
    fields less ``skip`` and ``run`` gets the built config; without, its flags are ``run``'s own
    keyword arguments."""

    run: Callable[..., None]
    schema: type | None = None
    skip: frozenset[str] = frozenset()
    epilog: Callable[[], str] | None = None

    @property
    def summary(self) -> str:
        """The first line of ``run``'s docstring: the verb's one-line purpose."""
        return inspect.getdoc(self.run).splitlines()[0]

    def add_arguments(self, parser: ArgumentParser) -> list[str]:
        """Add the verb's flags to ``parser``; returns its top-level keys."""
        if self.schema is None:
            return parser.add_function_arguments(self.run, as_group=False, sub_configs=True)
        return parser.add_class_arguments(self.schema, as_group=False, skip=set(self.skip), sub_configs=True)

    def __call__(self, settings: dict[str, Any]) -> None:
        """Run the verb on its parsed settings."""
        if self.schema is None:
            self.run(**settings)
        else:
            self.run(self.schema(**settings))


VERBS = {
    "merge": Verb(merge, MergeConfig, epilog=method_table),
    # A sweep names each point after its parameters (SweepConfig refuses a tag).
    "sweep": Verb(sweep, SweepConfig, skip=frozenset({"tag"}), epilog=method_table),
    "evaluate": Verb(evaluate),
    "demo": Verb(demo),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the epilog (the method table) laid out as written."""


def build_parser() -> tuple[ArgumentParser, dict[str, list[str]]]:
    """The parser of every verb but fit/validate/test, and the top-level keys each verb takes."""
    # The verbs' parsers take the formatter of this one.
    parser = ArgumentParser(prog="lmerge", exit_on_error=False, formatter_class=_HelpFormatter)
    subcommands = parser.add_subcommands(required=True)
    keys = {}
    for name, verb in VERBS.items():
        epilog = verb.epilog() if verb.epilog else None
        subparser = ArgumentParser(description=verb.summary, epilog=epilog)
        subparser.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file.")
        keys[name] = verb.add_arguments(subparser)
        subcommands.add_subcommand(name, subparser, help=verb.summary)
    return parser, keys


def run_verb(argv: list[str]) -> None:
    """Parse ``argv`` (a verb and its flags, ``--config`` files read by :func:`expand_args`) and
    run the verb."""
    parser, keys = build_parser()
    try:
        settings = parser.parse_args(expand_args(argv, keys))
    except ArgumentError as exc:
        hinted = console.with_flag_hint(exc, keys.get(argv[0], []))
        if hinted is None:
            raise
        raise hinted from None
    name = settings.subcommand
    # Sections (save, search) stay mappings: the config dataclass builds and checks them.
    chosen = settings[name].clone(with_meta=False).as_dict()
    chosen.pop("config", None)
    with removed_if_left_empty(chosen.get("output_dir") or DEFAULT_OUTPUT_DIR):
        VERBS[name](chosen)


def _note(message: str) -> None:
    print(f"lmerge: note: {message}", file=sys.stderr)


def expand_args(argv: list[str], keys: dict[str, list[str]]) -> list[str]:
    """Read every ``--config FILE`` ourselves (legacy keys migrated, unknown keys named with the
    file, ``keys`` being each verb's top-level keys) and hand jsonargparse the result; map the
    legacy ``--lambda`` flag."""
    if not argv or argv[0] not in keys:
        return argv
    accepted = set(keys[argv[0]])
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
                hint = did_you_mean(unknown[0], accepted)
                raise ConfigError(f"{value}: {unknown[0]}: unknown key for lmerge {argv[0]}{hint} (valid: {valid})")
            out += ["--config", yaml.safe_dump(data, default_flow_style=True, width=1 << 30)]
        else:
            out.append(arg)
    return out


def overview() -> str:
    """``lmerge --help``: every verb with its one-line purpose."""
    verbs = {name: verb.summary for name, verb in VERBS.items()}
    verbs |= {
        "fit": "Learn merge coefficients (AdaMerging, gradient, SuperMerge, regret smooth-max) or fine-tune a LoRA.",
        "validate": "Run a learner's validation loop (LightningCLI).",
        "test": "Run a learner's test loop (LightningCLI).",
    }
    lines = [
        "usage: lmerge VERB [options]   (lmerge VERB --help for its options; --verbose shows the libraries' "
        "notes and warnings, --debug tracebacks)",
        "",
    ]
    lines += [f"  {verb:<9} {text}" for verb, text in verbs.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the ``lmerge`` command; returns the exit code."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # Every YAML value jsonargparse reads (fit's configs, flag values) goes through the strict reader.
    set_loader("yaml", strict_loader(_JSONARGPARSE_YAML))
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, verbose = "--debug" in argv, "--verbose" in argv
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    console.configure(verbose)
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"lmerge(\.|$)")
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0
    try:
        if argv[0] in LIGHTNING_VERBS:
            lightning(argv, verbose)
            return 0
        run_verb(argv)
    except LMergeError as exc:
        if debug:
            raise
        print(f"lmerge: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # LightningCLI's parser wraps an error raised while building the model or data in its own;
        # a full disk or a read-only folder can surface from any library that writes.
        cause = console.lmerge_cause(exc)
        environment = os_error_line(exc)
        if debug or not (cause or environment or isinstance(exc, ArgumentError)):
            raise
        print(f"lmerge: error: {cause or environment or console.argument_message(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
