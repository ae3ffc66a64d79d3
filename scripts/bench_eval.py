"""Benchmark evaluation throughput of a folded lmerge merge against the bare base model and PEFT.

    .venv/bin/python scripts/bench_eval.py [--examples 1024] [--batch-size 32] [--repeat 2] [--passes 1]
        [--threads N] [--cases ...] [--out results.json]

A MiniLM-shaped random BERT (hidden 384, 6 layers, 12 heads, intermediate 1536, 4 labels), a
WordPiece tokenizer over a few hundred random words, ``--examples`` test texts of 8-40 words,
four random PEFT LoRA adapters (r=8 on query and value, with a classifier head) and a task
catalog are generated once per run in a temporary directory, together with lmerge's
``task_vector`` merge of the four saved as a rank-32 LoRA. Every case then runs in its own
process (this script with ``--case``), which prints one JSON line. Each round runs every case
once, every other round in reverse order, and ``--repeat`` sets the rounds, so every ratio
compares runs made side by side: something else may be loading the machine.

- ``base``: the bare base model with task0's head, scored by ``Evaluator.score``.
- ``lmerge_merged:<method>``: the merge of the four adapters folded once into the Evaluator's
  model by a ``WeightFolder`` (the steps of ``run_merge`` with ``eval_tasks``), scored alike.
- ``peft_unmerged``: the saved merge loaded with ``PeftModel.from_pretrained`` and not merged,
  so every batch pays for the LoRA branches.
- ``peft_merged``: the same after ``merge_and_unload()``.

By default ``base``, ``lmerge_merged:task_vector`` and ``peft_unmerged`` run (``--cases all``
adds ``lmerge_merged:ties`` and ``peft_merged``).

Only the scoring is timed: the fastest of ``--passes`` scorings of task0 (``Evaluator.score``;
for the PEFT models, which it cannot take, the scoring loop inside it), after the split is
tokenized and a warm-up scoring of a 64-example task; model loading, tokenization and the
merge are not. Ratios are given in wall time and in the process's CPU time. Each case runs
one torch thread by default (``--threads``): on a small machine that another job shares, two
threads run in parallel or in turn depending on what the other job is doing at that moment,
which swings wall time by up to 1.7x; with one thread the per-round ratios stay within ~10%.

The first batch's logits of each case are compared with those of ``lmerge_merged:task_vector``,
which the PEFT cases should match to rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lmerge.data import TaskSpec
from lmerge.evaluation.evaluate import Evaluator
from lmerge.merge.writers import HEADS_DIR
from lmerge.tasks.kinds import get_kind
from lmerge.tasks.models import apply_head, load_model
from lmerge.tasks.spec import catalog_tasks

HIDDEN, LAYERS, HEADS, INTERMEDIATE, LABELS = 384, 6, 12, 1536, 4
ADAPTERS, RANK, ALPHA, TARGETS = 4, 8, 16, ("query", "value")
WORDS, MIN_WORDS, MAX_WORDS = 400, 8, 40
LABEL_NAMES = ["north", "south", "east", "west"]
WARMUP, WARMUP_TASK = 64, "warmup"
BASE = "base"
CASES = ("base", "lmerge_merged:task_vector", "lmerge_merged:ties", "peft_unmerged", "peft_merged")
DEFAULT_CASES = ("base", "lmerge_merged:task_vector", "peft_unmerged")
# The PEFT cases load lmerge's saved task_vector merge: their logits should match this case's.
REFERENCE = "lmerge_merged:task_vector"


# ---- data ------------------------------------------------------------------------------------
def random_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct lowercase words of 3 to 9 letters."""
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))))
    return sorted(words)


def generate(root: Path, examples: int) -> None:
    """Write the base model and tokenizer (``root/base``), the test data, the adapters
    (``root/adapters/task<i>``), the catalog (``root/catalog.yaml``) and lmerge's rank-32
    ``task_vector`` merge of the adapters (its run bundle path in ``root/merged.txt``)."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BertConfig, BertTokenizer
    from transformers.utils import logging

    from lmerge.merge.config import MergeConfig, SaveConfig
    from lmerge.pipeline import run_merge

    logging.disable_progress_bar()
    rng = random.Random(0)
    words = random_words(rng, WORDS)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(specials + words)})
    tokenizer.save_pretrained(root / BASE)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        num_labels=LABELS,
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / BASE)

    rows = [
        {
            "text": " ".join(rng.choices(words, k=rng.randint(MIN_WORDS, MAX_WORDS))),
            "label": rng.choice(LABEL_NAMES),
        }
        for _ in range(examples)
    ]
    (root / "test.json").write_text(json.dumps(rows))
    (root / "warmup.json").write_text(json.dumps(rows[:WARMUP]))

    # Loaded from the saved directory, so the adapters' base_model_name_or_path points at it.
    model = AutoModelForSequenceClassification.from_pretrained(root / BASE)
    lora = LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS))
    wrapped = get_peft_model(model, lora)
    tasks: dict[str, dict[str, Any]] = {}
    for i in range(ADAPTERS):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in wrapped.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
        wrapped.save_pretrained(root / "adapters" / f"task{i}")
        tasks[f"task{i}"] = {
            "adapter": f"adapters/task{i}",
            "dataset": {"path": "json", "data_files": {"test": "test.json"}},
            "label_names": LABEL_NAMES,
        }
    warmup = {**tasks["task0"], "dataset": {"path": "json", "data_files": {"test": "warmup.json"}}}
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": {**tasks, WARMUP_TASK: warmup}}))
    merged = run_merge(
        MergeConfig(
            adapters=list(tasks),
            method="task_vector",
            catalog=str(catalog),
            save=SaveConfig(format="lora", rank=ADAPTERS * RANK),
            output_dir=str(root / "merges"),
        )
    )
    (root / "merged.txt").write_text(str(merged.run_dir))


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


def peft_model(root: Path, head: dict[str, torch.Tensor], merge: bool) -> nn.Module:
    """The saved ``task_vector`` merge on the base model through PEFT, merged into it or not.
    The head goes into the base model before PEFT wraps it (``apply_head`` on a ``PeftModel``
    would register it on the wrapper, where the forward pass never uses it)."""
    from peft import PeftModel

    kind = get_kind("classification")
    base = load_model(str(root / BASE), kind)
    apply_head(base, kind, head)
    model = PeftModel.from_pretrained(base, (root / "merged.txt").read_text())
    return (model.merge_and_unload() if merge else model).eval()


def run_case(name: str, root: Path, batch_size: int, passes: int) -> dict[str, Any]:
    """Set up case ``name``, tokenize task0's test split, warm up on the small warm-up task,
    then time ``passes`` scorings of task0: ``Evaluator.score`` for the base model and the
    folded merges, the same scoring loop for the PEFT models."""
    tasks = catalog_tasks(str(root / "catalog.yaml"), ["task0", WARMUP_TASK])
    head = load_file(Path((root / "merged.txt").read_text()) / HEADS_DIR / "task0.safetensors")
    evaluator = Evaluator(tasks, "test", output_root=root / "eval", batch_size=batch_size, base_model=str(root / BASE))
    if name.startswith("peft_"):
        model = peft_model(root, head, merge=name == "peft_merged").to(evaluator.device)

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
    return {
        "case": name,
        "examples": examples,
        "seconds": min(seconds),
        "examples_per_s": examples / min(seconds),
        "cpu_seconds": min(cpu_seconds),
        "examples_per_cpu_s": examples / min(cpu_seconds),
        "accuracy": accuracy,
        "peak_mb": max(setup_peak, scoring_peak),
        "scoring_peak_mb": scoring_peak,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "first_batch_logits": logits.tolist(),
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
    """Per case: its best run, every round's throughput over the base model's in that same
    round (side by side) and their median, that median in CPU time, and how far its logits are
    from the reference's."""
    ok = [r for r in rounds if "error" not in r[BASE]]
    summary = []
    for case in cases:
        runs = [r[case] for r in rounds if "error" not in r[case]]
        if not runs:
            summary.append({"case": case, "error": rounds[-1][case]["error"]})
            continue
        same_round = [r for r in ok if "error" not in r[case]]
        ratios = [r[case]["examples_per_s"] / r[BASE]["examples_per_s"] for r in same_round]
        cpu_ratios = [r[case]["examples_per_cpu_s"] / r[BASE]["examples_per_cpu_s"] for r in same_round]
        reference = next((r[REFERENCE] for r in rounds if "error" not in r.get(REFERENCE, {"error": ""})), None)
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
        "| case | examples/s (best) | × base (median) | × base per round | × base in CPU time | accuracy "
        f"| max Δlogits vs {REFERENCE} | parameters | peak RSS MB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        if "error" in s:
            lines.append(f"| {s['case']} | error: {s['error'][:100]} | | | | | | | |")
            continue
        cells = [
            s["case"],
            f"{s['examples_per_s']:.1f}",
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
    parser.add_argument("--examples", type=int, default=1024, help="test examples")
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
        help=f"{', '.join(CASES)} or all; base always runs (default: {' '.join(DEFAULT_CASES)})",
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
    cases = [BASE] + [case for case in chosen if case != BASE]
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
        generate(root, args.examples)
        print(f"generated the model, data, adapters and merge in {time.perf_counter() - started:.1f} s", flush=True)
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
        f"{args.examples} test examples of {MIN_WORDS}-{MAX_WORDS} words, batch size {args.batch_size}, "
        f"{args.repeat} rounds of {args.passes} timed pass(es), {time.perf_counter() - started:.0f} s in all"
    )
    print(table(summary))
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "summary": summary, "rounds": rounds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
