"""Benchmark evaluation throughput of a folded lmerge merge against the bare base model and PEFT,
for classification and for generation.

    .venv/bin/python scripts/bench_eval.py [--examples 1024] [--gen-examples 256] [--batch-size 32]
        [--repeat 2] [--passes 1] [--threads N] [--cases ...] [--out results.json]

Two setups (``scripts/bench_eval_setups.py``: random models, data, four random PEFT LoRA adapters
and lmerge's ``task_vector`` merge of them saved as a rank-32 LoRA) are generated once per run in
a temporary directory: ``classify`` (a MiniLM-shaped BERT, ``--examples`` texts of 8-40 words, a
classification task) and ``generate`` (a small Llama, ``--gen-examples`` prompts of 8-24 words, a
generation task: greedy, batched, left-padded, 16 new tokens per answer, and no EOS, so every case
generates the same number of tokens). Every case then runs in its own process (this script with
``--case``), which prints one JSON line. Each round runs every case once, every other round in
reverse order, and ``--repeat`` sets the rounds, so every ratio compares runs made side by side:
something else may be loading the machine.

Cases of the ``classify`` setup (those of ``generate`` are the same, named ``generate:<case>``):

- ``base``: the bare base model (with task0's head), scored by ``Evaluator.score``.
- ``lmerge_merged:<method>``: the merge of the four adapters folded once into the Evaluator's
  model by a ``WeightFolder`` (the steps of ``run_merge`` with ``eval_tasks``), scored alike.
- ``peft_unmerged``: the saved merge loaded with ``PeftModel.from_pretrained`` and not merged,
  so every batch pays for the LoRA branches.
- ``peft_merged``: the same after ``merge_and_unload()``.

By default ``base``, ``lmerge_merged:task_vector``, ``peft_unmerged``, ``generate:base`` and
``generate:lmerge_merged:task_vector`` run (``--cases all`` adds ``lmerge_merged:ties``,
``peft_merged`` and ``generate:peft_unmerged``). Each case's ratio is to its own setup's ``base``.

Only the scoring is timed: the fastest of ``--passes`` scorings of task0 (``Evaluator.score``;
for the PEFT models, which it cannot take, the scoring loop inside it), after the split is
tokenized and a warm-up scoring of a 64-example task; model loading, tokenization and the
merge are not. Ratios are given in wall time and in the process's CPU time. Each case runs
one torch thread by default (``--threads``): on a small machine that another job shares, two
threads run in parallel or in turn depending on what the other job is doing at that moment,
which swings wall time by up to 1.7x; with one thread the per-round ratios stay within ~10%.

The first batch's logits (a language model's at the last position) of each case are compared
with those of its setup's ``lmerge_merged:task_vector``, which the PEFT cases should match to
rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_eval_setups import ADAPTERS, BASE, CLASSIFY, GENERATE, NEW_TOKENS, SETUPS, WARMUP_TASK
from safetensors.torch import load_file
from torch import nn

from lmerge.data import TaskSpec
from lmerge.evaluation.evaluate import Evaluator
from lmerge.merge.writers import HEADS_DIR
from lmerge.tasks.models import apply_head, load_model
from lmerge.tasks.spec import catalog_tasks

GENERATE_PREFIX = f"{GENERATE}:"
CASES = (
    "base",
    "lmerge_merged:task_vector",
    "lmerge_merged:ties",
    "peft_unmerged",
    "peft_merged",
    "generate:base",
    "generate:lmerge_merged:task_vector",
    "generate:peft_unmerged",
)
DEFAULT_CASES = (
    "base",
    "lmerge_merged:task_vector",
    "peft_unmerged",
    "generate:base",
    "generate:lmerge_merged:task_vector",
)
# The PEFT cases load lmerge's saved task_vector merge: their logits should match this case's.
REFERENCE = "lmerge_merged:task_vector"


def setup_of(case: str) -> tuple[str, str]:
    """``(setup, case within it)``: ``generate:base`` is ``(generate, base)``, ``base`` ``(classify, base)``."""
    return (GENERATE, case.removeprefix(GENERATE_PREFIX)) if case.startswith(GENERATE_PREFIX) else (CLASSIFY, case)


def in_setup(case: str, name: str) -> str:
    """The case called ``name`` in ``case``'s setup (its base, its reference)."""
    return GENERATE_PREFIX + name if setup_of(case)[0] == GENERATE else name


# ---- one case, in the child process ----------------------------------------------------------
def peak_rss_mb() -> float:
    """The peak resident set size (``VmHWM``) of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmHWM")


def reset_peak_rss() -> None:
    """Reset the peak-RSS mark (Linux >= 4.0) so that ``VmHWM`` covers only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


def fold_merge(evaluator: Evaluator, root: Path, method_name: str) -> None:
    """Merge the four adapters with ``method_name`` (default parameters) and fold the result
    into the evaluator's model, as ``run_merge`` does for ``eval_tasks``."""
    from lmerge.adapters.align import align_keys, check_compatible
    from lmerge.merge.engine import merge_modules
    from lmerge.merge.policies import build_policy
    from lmerge.methods import get_method
    from lmerge.tasks.resolve import resolve_adapters

    adapters = resolve_adapters([f"task{i}" for i in range(ADAPTERS)], root / "catalog.yaml")
    method = get_method(method_name)
    params = method.normalize_params({}, len(adapters))
    check_compatible(adapters)
    keys, _ = align_keys(adapters, "common")
    folder = evaluator.folder(adapters[0].fan_in_fan_out)
    for module in merge_modules(adapters, keys, method, params, build_policy("scalar", method, params)):
        folder.add(module)


def peft_model(root: Path, evaluator: Evaluator, head: dict[str, torch.Tensor] | None, merge: bool) -> nn.Module:
    """The saved ``task_vector`` merge on the base model through PEFT, merged into it or not.
    A head goes into the base model before PEFT wraps it (``apply_head`` on a ``PeftModel``
    would register it on the wrapper, where the forward pass never uses it)."""
    from peft import PeftModel

    base = load_model(str(root / BASE), evaluator.kind)
    if head:
        apply_head(base, evaluator.kind, head)
    model = PeftModel.from_pretrained(base, (root / "merged.txt").read_text())
    return (model.merge_and_unload() if merge else model).eval()


def run_case(case: str, data: Path, batch_size: int, passes: int) -> dict[str, Any]:
    """Set up ``case``, tokenize task0's test split of its setup, warm up on the small warm-up
    task, then time ``passes`` scorings of task0: ``Evaluator.score`` for the base model and the
    folded merges, the same scoring loop for the PEFT models."""
    setup, name = setup_of(case)
    root = data / setup
    tasks = catalog_tasks(str(root / "catalog.yaml"), ["task0", WARMUP_TASK])
    evaluator = Evaluator(tasks, "test", output_root=root / "eval", batch_size=batch_size, base_model=str(root / BASE))
    heads = Path((root / "merged.txt").read_text()) / HEADS_DIR
    head = load_file(heads / "task0.safetensors") if evaluator.kind.has_head else None
    if name.startswith("peft_"):
        model = peft_model(root, evaluator, head, merge=name == "peft_merged").to(evaluator.device)

        def score(task: TaskSpec) -> tuple[float, int]:
            with torch.inference_mode():
                module = evaluator.data(task)
                batches = module.dataloader(evaluator.split)
                return evaluator.kind.score(model, batches, task, module, evaluator.device)

    else:
        model = evaluator.model
        if name != BASE:
            fold_merge(evaluator, root, name.split(":", 1)[1])

        def score(task: TaskSpec) -> tuple[float, int]:
            result = evaluator.score(task, head)
            return result.value, result.examples

    evaluator.data(tasks[0]).setup("test")
    score(tasks[1])
    setup_peak = peak_rss_mb()
    reset_peak_rss()
    seconds, cpu_seconds = [], []
    for _ in range(passes):
        started, cpu_started = time.perf_counter(), time.process_time()
        accuracy, examples = score(tasks[0])
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    scoring_peak = peak_rss_mb()
    batch = next(iter(evaluator.data(tasks[0]).dataloader(evaluator.split)))
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    generated = NEW_TOKENS * examples if setup == GENERATE else None
    return {
        "case": case,
        "examples": examples,
        "seconds": min(seconds),
        "examples_per_s": examples / min(seconds),
        "generated_tokens_per_s": generated / min(seconds) if generated else None,
        "cpu_seconds": min(cpu_seconds),
        "examples_per_cpu_s": examples / min(cpu_seconds),
        "accuracy": accuracy,
        "peak_mb": max(setup_peak, scoring_peak),
        "scoring_peak_mb": scoring_peak,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        # A language model's at the last position: [batch, vocabulary] like a classifier's.
        "first_batch_logits": (logits[:, -1] if logits.dim() == 3 else logits).tolist(),
    }


# ---- the parent: rounds of every case, each in its own process, and the table ----------------
def measure(name: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One run of case ``name`` in a fresh process."""
    env = {
        **os.environ,
        "OMP_WAIT_POLICY": "PASSIVE",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(root / "datasets_cache"),
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    command = [sys.executable, __file__, "--case", name, "--data", str(root)]
    command += ["--batch-size", str(args.batch_size), "--passes", str(args.passes), "--threads", str(args.threads)]
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
        return {"case": name, "error": lines[-1]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    """Largest absolute difference of two runs' first-batch logits."""
    return float((torch.tensor(a) - torch.tensor(b)).abs().max())


def summarize(rounds: list[dict[str, dict[str, Any]]], cases: list[str]) -> list[dict[str, Any]]:
    """Per case: its best run, every round's throughput over its setup's base model's in that
    same round (side by side) and their median, that median in CPU time, and how far its logits
    are from its setup's reference's."""
    summary = []
    for case in cases:
        runs = [r[case] for r in rounds if "error" not in r[case]]
        if not runs:
            summary.append({"case": case, "error": rounds[-1][case]["error"]})
            continue
        base, reference_case = in_setup(case, BASE), in_setup(case, REFERENCE)
        same_round = [r for r in rounds if "error" not in r[base] and "error" not in r[case]]
        ratios = [r[case]["examples_per_s"] / r[base]["examples_per_s"] for r in same_round]
        cpu_ratios = [r[case]["examples_per_cpu_s"] / r[base]["examples_per_cpu_s"] for r in same_round]
        found = [r[reference_case] for r in rounds if "error" not in r.get(reference_case, {"error": ""})]
        reference = found[0] if found else None
        best = max(runs, key=lambda run: run["examples_per_s"])
        logits = best["first_batch_logits"]
        summary.append(
            {
                **{key: value for key, value in best.items() if key != "first_batch_logits"},
                "runs_examples_per_s": [run["examples_per_s"] for run in runs],
                "ratios_vs_base": ratios,
                "ratio_vs_base": statistics.median(ratios) if ratios else None,
                "cpu_ratio_vs_base": statistics.median(cpu_ratios) if cpu_ratios else None,
                "peak_mb": max(run["peak_mb"] for run in runs),
                "logits_vs_reference": max_difference(logits, reference["first_batch_logits"]) if reference else None,
            }
        )
    return summary


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(summary: list[dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| case | examples/s (best) | generated tokens/s | × base (median) | × base per round "
        f"| × base in CPU time | accuracy / exact match | max Δlogits vs {REFERENCE} | parameters | peak RSS MB |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        if "error" in s:
            lines.append(f"| {s['case']} | error: {s['error'][:100]} | | | | | | | | |")
            continue
        cells = [
            s["case"],
            f"{s['examples_per_s']:.1f}",
            _number(s["generated_tokens_per_s"], ".0f"),
            _number(s["ratio_vs_base"], ".3f"),
            " ".join(f"{r:.3f}" for r in s["ratios_vs_base"]),
            _number(s["cpu_ratio_vs_base"], ".3f"),
            f"{s['accuracy']:.4f}",
            _number(s["logits_vs_reference"], ".1e"),
            f"{s['parameters']:,}",
            f"{s['peak_mb']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1024, help="test examples of the classify setup")
    parser.add_argument("--gen-examples", type=int, default=256, help="test prompts of the generate setup")
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of all cases (best run, median ratio)")
    parser.add_argument("--passes", type=int, default=1, help="timed scorings per run; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each case (module docstring)")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=[*CASES, "all"],
        default=list(DEFAULT_CASES),
        metavar="CASE",
        help=f"{', '.join(CASES)} or all; each setup's base runs with it (default: {' '.join(DEFAULT_CASES)})",
    )
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case, args.data, args.batch_size, args.passes)))
        return

    chosen = CASES if "all" in args.cases else args.cases
    bases = list(dict.fromkeys(in_setup(case, BASE) for case in chosen))
    cases = bases + [case for case in chosen if case not in bases]
    setups = {setup_of(case)[0] for case in cases}
    sizes = {CLASSIFY: args.examples, GENERATE: args.gen_examples}
    machine = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": args.threads,
        "default_threads": default_threads,
        "load_before": os.getloadavg()[0],
    }
    rounds: list[dict[str, dict[str, Any]]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        root = Path(tmp)
        for setup in sorted(setups):
            (root / setup).mkdir()
            SETUPS[setup](root / setup, sizes[setup])
        print(f"generated the models, data, adapters and merges in {time.perf_counter() - started:.1f} s", flush=True)
        for index in range(args.repeat):
            results = {}
            # Every other round runs backwards, so a load that drifts during a round favours no case.
            for case in cases if index % 2 == 0 else cases[::-1]:
                results[case] = result = measure(case, root, args)
                shown = result.get("error") or f"{result['examples_per_s']:.1f} examples/s"
                print(f"  round {index + 1} {case}: {shown}", flush=True)
            rounds.append(results)
    machine["load_after"] = os.getloadavg()[0]
    summary = summarize(rounds, cases)
    print()
    print(
        "machine: {cpus} CPUs, torch {torch}, {torch_threads} torch threads ({default_threads} by default), "
        "1-min load average {load_before:.2f} before / {load_after:.2f} after".format(**machine)
    )
    print(
        f"{args.examples} classify examples, {args.gen_examples} generate prompts ({NEW_TOKENS} new tokens each), "
        f"batch size {args.batch_size}, {args.repeat} rounds of {args.passes} timed pass(es), "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    print(table(summary))
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "summary": summary, "rounds": rounds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
