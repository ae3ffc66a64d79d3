"""Benchmark one coefficient-learning step: lmerge's fused LoRA linear against the no-merge limit,
lmerge's dense reference and FusionBench's ``LayerWiseMergedModel``.

    .venv/bin/python scripts/bench_fit_step.py [--models minilm llama] [--n 2 4 8 16] [--llama-n 2 8]
        [--cases limit fused dense fusionbench] [--steps 5] [--llama-steps 2] [--warmup 1] [--repeat 1]
        [--threads 0] [--fusionbench-python /tmp/fbvenv/bin/python] [--out results.json]

FusionBench lives in its own venv (its pins clash with lmerge's), e.g.::

    python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install torch==2.13.0 fusion-bench==0.2.33 transformers==5.24.0

Without that interpreter the ``fusionbench`` case is skipped.

Two random models, generated once per run in a temporary directory with ``max(n)`` random PEFT
LoRA adapters each (r=8, alpha=16, saved with ``save_pretrained``) and a task catalog over them:

- ``minilm``: BertForSequenceClassification, hidden 384, 6 layers, 12 heads, intermediate 1536,
  vocab 30522, 4 labels; LoRA on query, value (12 modules);
- ``llama``: LlamaForCausalLM, hidden 1024, 8 layers, 16 heads, intermediate 2816, vocab 512;
  LoRA on q, v, o, up, down (40 modules); a ``label_tokens`` task with 2 label words (the answer is
  the last 2 tokens; the objective reads the label words' logits before it, as lmerge's does).

Every (model, n, case) runs in its own process (this script with ``--case``, OMP_WAIT_POLICY=PASSIVE)
that prints one JSON line. One step is a batch of 16 x 64 tokens of one task (task0) in float32,
entropy of the predictions (AdaMerging's objective), backward, Adam on the trainable tensor:

- ``limit``: the base model, no merging; a scalar parameter multiplies the input embeddings, so the
  backward pass runs through every layer down to the activations but computes no weight gradient;
- ``fused``: lmerge's real step: ``AdaMerging`` (layer-wise, clamp, init 0.3) built from the catalog
  with all n adapters, ``configure_model()``; then ``training_step({"task0": batch})``, backward,
  the Adam of ``configure_optimizers()`` with the projection of ``optimizer_step`` (``coefficients.project_()``),
  and ``on_train_batch_end``;
- ``dense``: the same with ``merge_impl="dense"`` (lmerge's reference, n dense deltas per module);
- ``fused_rank_wise`` (not run by default): ``fused`` with ``granularity="rank_wise"`` (a coefficient
  per rank direction of each module, on top of the layer-wise ones);
- ``fusionbench``: ``LayerWiseMergedModel`` over the base model and n PEFT ``merge_and_unload``
  models, as FusionBench's layer-wise AdaMerging builds it: a task vector for every parameter the
  pretrained model leaves trainable (all but the task head here, which holds task0's head as in
  lmerge), one weight per model and tensor, clamped to [0, 1], init 0.3, ``strict=False`` (the
  merged state dict lacks BERT's non-persistent buffers); FusionBench's ``entropy_loss`` and its
  loop order: ``backward(retain_graph=True)``, Adam step, ``merge_weights()``;
- ``fusionbench_targets`` (not run by default): the same with task vectors for the LoRA-targeted
  weights only, the most favourable set-up for FusionBench (the others are zero anyway);
- ``paired`` (not run by default): ``limit`` and ``fused`` in one process, their steps alternated;
  the median per-round ratio is the steadiest check of the 1.1x target on a busy machine (no RSS).

Models are in eval mode in every case (FusionBench's loop calls ``train()``; dropout only adds noise).

Reported: the median wall time of ``--steps`` steps after ``--warmup`` steps, and the peak RSS over
them (VmHWM, reset through /proc/self/clear_refs once the model is built and after ``malloc_trim``)
next to the RSS at that reset (the base weights are mmapped from safetensors: they count once
touched, so in the peak, not at the reset). The ratio column is the step time over the ``limit`` of the same
model and n (the limit is measured at every n, right before the others, to pair them in time).

On a shared machine other processes inflate the wall times at random; ``--repeat R`` runs the whole
sweep R times, round by round, and keeps each case's fastest run (the CPU ms column helps too).

Defaults: limit, fused, dense, fusionbench; MiniLM at n = 2, 4, 8, 16 with 5 timed steps; Llama
at n = 2, 8 (``--llama-n``) with 2 (``--llama-steps``): a Llama step takes 3-10 s on 2 cores, and
at n = 16 the dense and FusionBench cases hold 16 dense copies of the merged weights (4.5-6.7 GB).
The default run takes 8-10 minutes on a 2-core machine, depending on what else runs there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BATCH, SEQ = 16, 64
RANK, ALPHA = 8, 16
INIT, LR = 0.3, 1e-3
TASK = "task0"
ANSWER_TOKENS = 2
LABEL_WORDS = 2
CASES = ("limit", "fused", "fused_rank_wise", "dense", "fusionbench", "fusionbench_targets", "paired")
DEFAULT_CASES = ("limit", "fused", "dense", "fusionbench")
DEFAULT_FB_PYTHON = "/tmp/fbvenv/bin/python"


@dataclass(frozen=True)
class Shape:
    """A benchmark model: architecture, task kind and LoRA targets."""

    family: str
    kind: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    targets: tuple[str, ...]
    num_labels: int = 0


MODELS = {
    "minilm": Shape("bert", "classification", 384, 6, 12, 1536, 30522, ("query", "value"), num_labels=4),
    "llama": Shape(
        "llama", "label_tokens", 1024, 8, 16, 2816, 512, ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    ),
}


# ---- data: a base model, n adapters and a catalog (parent process) ----------------------------------
def generate(root: Path, shape: Shape, n_adapters: int) -> None:
    """Save the random base model to ``root/base``, ``n_adapters`` random PEFT LoRA adapters (non-zero
    A, B and, for classification, a head) to ``root/adapters/task<i>``, and ``root/catalog.yaml``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    if shape.family == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.intermediate,
            max_position_embeddings=512,
            num_labels=shape.num_labels,
        )
        model = BertForSequenceClassification(config)
        task_type = "SEQ_CLS"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.heads,
            max_position_embeddings=512,
        )
        model = LlamaForCausalLM(config)
        task_type = "CAUSAL_LM"
    model.save_pretrained(root / "base")
    model.name_or_path = str(root / "base")  # becomes the adapters' base_model_name_or_path
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(shape.targets), task_type=task_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, lora)
    trained = [(name, p) for name, p in peft_model.named_parameters() if "lora_" in name or "modules_to_save" in name]
    for i in range(n_adapters):
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in trained:
                scale = 0.05 if "modules_to_save" in name else 1 / math.sqrt(param.shape[-1])
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
        peft_model.save_pretrained(root / "adapters" / f"task{i}")
    write_catalog(root, shape, n_adapters)


def write_catalog(root: Path, shape: Shape, n_adapters: int) -> None:
    """A catalog with tasks task0..task<n-1> (their adapter and a tiny json dataset); JSON is YAML."""
    (root / "data.json").write_text(json.dumps([{"text": "a b c", "label": "l0"}, {"text": "c d", "label": "l1"}]))
    labels = [f"l{i}" for i in range(shape.num_labels or LABEL_WORDS)]
    tasks = {}
    for i in range(n_adapters):
        entry: dict[str, Any] = {
            "adapter": f"adapters/task{i}",
            "kind": shape.kind,
            "dataset": {"path": "json", "data_files": {"train": "data.json"}},
            "label_names": labels,
        }
        if shape.kind == "label_tokens":
            entry["prompt"] = "Question: {text} Answer:"
        tasks[f"task{i}"] = entry
    (root / "catalog.yaml").write_text(json.dumps({"tasks": tasks}, indent=1))


# ---- one case, in the child process -------------------------------------------------------------
def memory_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Give freed heap back to the OS, then reset the peak-RSS mark so that VmHWM covers what follows."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")


def make_batch(shape: Shape) -> dict[str, Any]:
    """A fixed random batch as lmerge's collator makes it: ``input_ids``, ``attention_mask`` and
    ``labels`` (class ids; or -100 but for the answer tokens, with ``class_ids`` and the label words'
    ``candidates`` [C, 1])."""
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, shape.vocab, (BATCH, SEQ), generator=generator)
    if shape.kind == "classification":
        labels = torch.randint(shape.num_labels, (BATCH,), generator=generator)
    else:
        labels = torch.full_like(input_ids, -100)
        labels[:, -ANSWER_TOKENS:] = input_ids[:, -ANSWER_TOKENS:]
        candidates = torch.arange(3, 3 + LABEL_WORDS).unsqueeze(1)
        class_ids = torch.randint(LABEL_WORDS, (BATCH,), generator=generator)
        input_ids[:, -ANSWER_TOKENS] = candidates[class_ids, 0]
        labels[:, -ANSWER_TOKENS] = input_ids[:, -ANSWER_TOKENS]
        extra = {"class_ids": class_ids, "candidates": candidates}
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels, **extra}
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def answer_logits(logits: Any, batch: dict[str, Any]) -> Any:
    """[B, C] logits the objective reads: the head's, or the LM's before the answer over the label words
    (what lmerge's ``answer_probs`` reads)."""
    import torch

    if logits.dim() == 2:
        return logits
    starts = (batch["labels"] != -100).int().argmax(-1)
    return logits[torch.arange(len(starts)), starts - 1][:, batch["candidates"][:, 0]]


def prepare_limit(shape: Shape, data: Path, n: int) -> Callable[[], None]:
    """The base model, frozen; a scalar on the input embeddings is the only trainable tensor."""
    import torch

    from lmerge.tasks.kinds import get_kind
    from lmerge.tasks.models import load_model

    kind = get_kind(shape.kind)
    model = load_model(str(data / "base"), kind).requires_grad_(False).eval()
    scale = torch.nn.Parameter(torch.ones(()))
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: output * scale)
    optimizer = torch.optim.Adam([scale], lr=LR)
    batch = make_batch(shape)

    def step() -> None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        probs = kind.predict(logits, batch)
        # AdaMerging's entropy (lmerge.learn.adamerging.entropy), without importing Lightning here.
        loss = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def prepare_lmerge(shape: Shape, data: Path, n: int, impl: str, granularity: str) -> Callable[[], None]:
    """lmerge's AdaMerging learner over n adapters from the catalog; one step as Lightning runs it."""
    from lmerge.learn import AdaMerging

    adapters = [f"task{i}" for i in range(n)]
    catalog = str(data / "catalog.yaml")
    learner = AdaMerging(catalog, adapters, [TASK], granularity=granularity, init=INIT, lr=LR, merge_impl=impl)
    learner.configure_model()
    learner.train()
    optimizer = learner.configure_optimizers()
    batch = {TASK: make_batch(shape)}
    index = [0]

    def step() -> None:
        loss = learner.training_step(batch, index[0])
        loss.backward()
        optimizer.step()
        learner.coefficients.project_()  # what the learner's optimizer_step adds to the optimizer's
        optimizer.zero_grad(set_to_none=True)
        learner.on_train_batch_end(loss, batch, index[0])
        index[0] += 1

    return step


def prepare_fusionbench(shape: Shape, data: Path, n: int, targets_only: bool) -> Callable[[], None]:
    """FusionBench's LayerWiseMergedModel over n merged-LoRA models; its AdaMerging loop's step. Task
    vectors for every parameter but the task head, or (``targets_only``) for the LoRA-targeted weights."""
    import torch
    from fusion_bench.method.adamerging.entropy_loss import entropy_loss
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights
    from peft import PeftModel

    auto = _auto_class(shape)

    def load() -> torch.nn.Module:
        return auto.from_pretrained(str(data / "base"), dtype=torch.float32)

    finetuned = []
    for i in range(n):
        merged = PeftModel.from_pretrained(load(), str(data / "adapters" / f"task{i}")).merge_and_unload()
        finetuned.append(merged.requires_grad_(False).eval())
    pretrained = load().eval()
    if shape.kind == "classification":
        pretrained.classifier.load_state_dict(finetuned[0].classifier.state_dict())  # task0's head, as lmerge
    suffixes = tuple(f".{target}.weight" for target in shape.targets)
    merged_names = []
    for name, param in pretrained.named_parameters():
        param.requires_grad_(name.endswith(suffixes) if targets_only else not name.startswith("classifier."))
        if param.requires_grad:
            merged_names.append(name)
    weights = get_layer_wise_weights(n, len(merged_names), init_values=INIT)
    # strict=False: functional_call gets the state dict, which lacks BERT's non-persistent buffers.
    module = LayerWiseMergedModel(weights, pretrained, finetuned, clamp_weights=True, strict=False)
    del finetuned
    module.eval()
    optimizer = torch.optim.Adam([module.merge_weight], lr=LR)
    batch = make_batch(shape)
    module.merge_weights()
    state: dict[str, Any] = {}

    def step() -> None:
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Kept until the next step's loss replaces it, as FusionBench's loop keeps ``loss`` (retained graph).
        state["loss"] = loss = entropy_loss(answer_logits(logits, batch))
        loss.backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        module.merge_weights()

    return step


def _auto_class(shape: Shape) -> Any:
    import transformers

    name = "AutoModelForSequenceClassification" if shape.kind == "classification" else "AutoModelForCausalLM"
    return getattr(transformers, name)


def run_case(model: str, case: str, n: int, data: Path, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """Build case ``case`` with n adapters, then time ``warmup + steps`` steps and track peak RSS."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers.utils import logging

    logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    shape = MODELS[model]
    if case == "paired":
        return run_paired(model, n, data, steps, warmup)
    started = time.perf_counter()
    if case == "limit":
        step = prepare_limit(shape, data, n)
    elif case in ("fused", "fused_rank_wise", "dense"):
        impl = "dense" if case == "dense" else "fused_lora_linear"
        step = prepare_lmerge(shape, data, n, impl, "rank_wise" if case == "fused_rank_wise" else "layer_wise")
    else:
        step = prepare_fusionbench(shape, data, n, targets_only=case == "fusionbench_targets")
    build_s = time.perf_counter() - started
    reset_peak_rss()
    baseline = memory_mb("VmRSS")
    times, cpu_times = [], []
    for _ in range(warmup + steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return {
        "model": model,
        "case": case,
        "n": n,
        "step_ms": statistics.median(times[warmup:]) * 1000,
        "cpu_ms": statistics.median(cpu_times[warmup:]) * 1000,
        "steps_ms": [round(t * 1000, 1) for t in times],
        "baseline_mb": baseline,
        "peak_mb": memory_mb("VmHWM"),
        "build_s": build_s,
        "torch_threads": torch.get_num_threads(),
    }


def run_paired(model: str, n: int, data: Path, steps: int, warmup: int) -> dict[str, Any]:
    """``limit`` and ``fused`` built in one process, their steps alternated (the order flips every
    round): the median of the per-round ratios resists a machine whose load changes by the minute."""
    import torch

    shape = MODELS[model]
    limit = prepare_limit(shape, data, n)
    fused = prepare_lmerge(shape, data, n, "fused_lora_linear", "layer_wise")
    times: dict[str, list[float]] = {"limit": [], "fused": []}
    for index in range(warmup + steps):
        order = [("limit", limit), ("fused", fused)]
        for name, step in order if index % 2 else order[::-1]:
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    limit_s, fused_s = times["limit"][warmup:], times["fused"][warmup:]
    return {
        "model": model,
        "case": "paired",
        "n": n,
        "step_ms": statistics.median(fused_s) * 1000,
        "limit_ms": statistics.median(limit_s) * 1000,
        "ratio": statistics.median(f / b for f, b in zip(fused_s, limit_s)),
        "steps_ms": [round(t * 1000, 1) for t in times["fused"]],
        "limit_steps_ms": [round(t * 1000, 1) for t in times["limit"]],
        "torch_threads": torch.get_num_threads(),
    }


# ---- the parent: run every case in its own process and print the table ----------------------------
def measure(python: str, model: str, case: str, n: int, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One case in a fresh process under ``python``; an ``error`` entry when it fails."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    command = [python, __file__, "--case", case, "--models", model, "--n", str(n), "--data", str(data)]
    steps = args.llama_steps if model == "llama" else args.steps
    command += ["--steps", str(steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    try:
        child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": model, "case": case, "n": n, "error": f"timed out after {args.timeout} s"}
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
        return {"model": model, "case": case, "n": n, "error": lines[-1]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table; ratios are over the ``limit`` of the same model and n."""
    limits = {(r["model"], r["n"]): r["step_ms"] for r in results if r["case"] == "limit" and "error" not in r}
    lines = [
        "| model | n | case | step ms | CPU ms | peak RSS MB | RSS at reset MB | × limit |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        head = f"| {r['model']} | {r['n']} | {r['case']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:100]} | | | | |")
            continue
        if r["case"] == "paired":
            lines.append(f"{head} {r['step_ms']:.0f} (limit {r['limit_ms']:.0f}) | | | | {r['ratio']:.2f} |")
            continue
        limit = limits.get((r["model"], r["n"]))
        ratio = f"{r['step_ms'] / limit:.2f}" if limit else ""
        cells = f"{r['step_ms']:.0f} | {r['cpu_ms']:.0f} | {r['peak_mb']:.0f} | {r['baseline_mb']:.0f} | {ratio}"
        lines.append(f"{head} {cells} |")
    return "\n".join(lines)


def check_targets(results: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each as a PASS/FAIL line (only those the results can decide)."""
    got = {(r["model"], r["case"], r["n"]): r for r in results if "error" not in r}
    lines = []

    def verdict(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}: {text}")

    for (model, case, n), r in sorted(got.items()):
        limit = got.get((model, "limit", n))
        if case == "fused" and limit and n <= 16:
            ratio = r["step_ms"] / limit["step_ms"]
            verdict(ratio <= 1.1, f"{model} n={n}: fused step {ratio:.2f}x the limit (target <= 1.1x)")
        if case == "paired" and n <= 16:
            verdict(r["ratio"] <= 1.1, f"{model} n={n}: paired fused/limit {r['ratio']:.2f}x (target <= 1.1x)")
    for model in MODELS:
        small, large = got.get((model, "fused", 2)), got.get((model, "fused", 16))
        if small and large:
            growth = large["peak_mb"] / small["peak_mb"] - 1
            verdict(growth <= 0.05, f"{model}: fused peak RSS at n=16 is {growth:+.1%} of n=2 (target within 5%)")
    for model, n, faster, leaner in (("minilm", 16, 2.0, 3.0), ("llama", 8, 1.4, 3.5)):
        fused, peer = got.get((model, "fused", n)), got.get((model, "fusionbench", n))
        if fused and peer:
            speed, memory = peer["step_ms"] / fused["step_ms"], peer["peak_mb"] / fused["peak_mb"]
            verdict(speed >= faster, f"{model} n={n}: fused {speed:.2f}x faster than FusionBench (target >= {faster}x)")
            verdict(
                memory >= leaner, f"{model} n={n}: fused {memory:.2f}x leaner than FusionBench (target >= {leaner}x)"
            )
    return lines


def machine_line() -> dict[str, Any]:
    """CPU model, cores, memory, Python and torch versions of this machine."""
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    memory = next(
        line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": round(int(memory) / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load": os.getloadavg()[0],
    }


def describe(result: dict[str, Any]) -> str:
    """One case's result on one line."""
    if "error" in result:
        return result["error"]
    if result["case"] == "paired":
        return f"fused {result['step_ms']:.0f} ms, limit {result['limit_ms']:.0f} ms, ratio {result['ratio']:.3f}"
    return (
        f"{result['step_ms']:.0f} ms/step, CPU {result['cpu_ms']:.0f} ms, peak {result['peak_mb']:.0f} MB "
        f"(at reset {result['baseline_mb']:.0f} MB), steps {result['steps_ms']}"
    )


def sweep(args: argparse.Namespace, cases: list[str], data: dict[str, Path], fb_python: str) -> list[dict[str, Any]]:
    """Every (model, n, case) ``--repeat`` times, round by round; per case the run with the fastest median."""
    best: dict[tuple[str, int, str], dict[str, Any]] = {}
    for round_ in range(args.repeat):
        if args.repeat > 1:
            print(f"round {round_ + 1} of {args.repeat} (load average {os.getloadavg()[0]:.2f})", flush=True)
        for model in args.models:
            for n in args.llama_n if model == "llama" else args.n:
                for case in cases:
                    python = fb_python if case.startswith("fusionbench") else sys.executable
                    result = measure(python, model, case, n, data[model], args)
                    print(f"  {model} n={n} {case}: {describe(result)}", flush=True)
                    kept = best.get((model, n, case))
                    if (
                        kept is None
                        or "error" in kept
                        or ("error" not in result and result["step_ms"] < kept["step_ms"])
                    ):
                        best[(model, n, case)] = result
    return list(best.values())


def main() -> None:
    """Run the cases (or, with ``--case``, one case in this process) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16], help="adapter counts")
    parser.add_argument("--llama-n", type=int, nargs="+", default=[2, 8], help="adapter counts for llama")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (the median counts)")
    parser.add_argument("--llama-steps", type=int, default=2, help="timed steps per case for llama")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all cases; the fastest run counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    parser.add_argument("--fusionbench-python", default=DEFAULT_FB_PYTHON, help="interpreter with fusion-bench")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per case before it counts as failed")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(
            json.dumps(run_case(args.models[0], args.case, args.n[0], args.data, args.steps, args.warmup, args.threads))
        )
        return

    cases = list(args.cases)
    fb_python = args.fusionbench_python
    if not Path(fb_python).is_file():
        skipped = [case for case in cases if case.startswith("fusionbench")]
        if skipped:
            print(f"skipping {', '.join(skipped)}: no interpreter at {fb_python} (see --fusionbench-python)")
        cases = [case for case in cases if case not in skipped]
    machine = machine_line()
    print(
        "machine: {cpu}, {cpus} CPUs, {memory_gb} GB, Python {python}, torch {torch}, "
        "{torch_threads} torch threads, load average {load:.2f}".format(**machine)
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_fit_step_") as tmp:
        data = {}
        for model in args.models:
            counts = args.llama_n if model == "llama" else args.n
            data[model] = Path(tmp) / model
            begun = time.perf_counter()
            generate(data[model], MODELS[model], max(counts))
            print(f"{model}: base model and {max(counts)} adapters in {time.perf_counter() - begun:.1f} s", flush=True)
        results = sweep(args, cases, data, fb_python)
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s, load average now {os.getloadavg()[0]:.2f}\n")
    print(table(results))
    print()
    for line in check_targets(results):
        print(line)
    if args.out:
        shapes = {name: asdict(MODELS[name]) for name in args.models}
        settings = {
            "steps": args.steps,
            "llama_steps": args.llama_steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "repeat": args.repeat,
        }
        payload = {"machine": machine, "shapes": shapes, "args": settings}
        args.out.write_text(json.dumps({**payload, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
