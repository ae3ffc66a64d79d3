"""Benchmark lmerge at LLM scale: a fused learner step against the no-merge limit, static merges of
16 adapters, and the evaluation throughput of the folded model against the bare base model.

    .venv/bin/python scripts/bench_llm.py [--shape auto|7b|cpu|tiny] [--n 16] [--cases ...]
        [--steps 3] [--warmup 1] [--eval-batches 4] [--timeout 1200] [--out results.json]

Shapes (``auto``: ``7b`` where CUDA is available, else ``cpu``):

- ``7b``: Llama-7B: hidden 4096, 32 layers, intermediate 11008, 32 heads, vocabulary 32000; batch
  4 x 512 tokens; LoRA r=16; bf16 weights, steps under ``bf16-mixed`` autocast, on the GPU;
- ``cpu``: the same architecture scaled down, about 2 minutes of CPU time in all on 2 cores (5-6 minutes
  of wall time on a machine that others load):
  hidden 1024, 4 layers, intermediate 2752 (the 7B ratio), 16 heads, vocabulary 4096; batch 4 x 128;
  LoRA r=4, so that the stacked rank over the hidden size (n r / hidden = 1/16 at n=16) and hence
  the low-rank path's share of the FLOPs are those of the 7B shape; float32 without autocast (CPU
  bf16 is slow, and the learner turns autocast off on a CPU);
- ``tiny``: a few seconds in all, for the test of this script.

The base model is built from its config with random weights, directly in its dtype on the device
(seed 0, in every case's process: nothing is saved or downloaded). The n adapters (r on q, k, v, o,
gate, up, down; alpha 2r) are real PEFT adapter directories written by the parent once:
``adapter_config.json`` from ``peft.LoraConfig.save_pretrained`` and ``adapter_model.safetensors``
with PEFT's key names, random non-zero A and B in the shape's dtype; lmerge reads them as any others.

Every case runs in its own process (this script with ``--case``, OMP_WAIT_POLICY=PASSIVE) and
prints one JSON line:

- ``limit``: the base model, frozen, no merging; a scalar parameter multiplies the input embeddings,
  so the backward runs through every layer to the activations but computes no weight gradient;
- ``fused``: lmerge's AdaMerging (layer-wise, n adapters) built as ``lmerge fit`` builds it:
  ``configure_model`` under a Lightning Trainer of this device and precision, inside the strategy's
  ``tensor_init_context`` (its base model loader is handed the in-memory model); one step is
  ``training_step`` (under autocast on CUDA, as Lightning's ``bf16-mixed`` runs it), backward, Adam and
  the coefficients' projection. Same batch and objective (answer-token entropy) as ``limit``;
- ``paired``: ``limit`` and ``fused`` in one process, their steps alternated; the median of the
  per-round ratios is the steadiest time ratio on a machine that others load (no memory from it);
- ``merge:<method>``: one ``run_merge`` of the n adapter directories, saved as a LoRA: ``task_vector``
  (exact, rank n r), ``ties`` (dense in weight space, k=20, truncated SVD to rank r), and when they are
  registered in ``lmerge.methods.METHODS``: ``tsv``, ``iso_c``, ``knots_ties`` and ``ties`` with
  ``space: core`` (``ties:core``). lmerge's static engine runs on the CPU, module by module, on any machine;
- ``eval:base``, ``eval:folded``, ``eval:fused``: forward passes (inference mode, autocast on CUDA) over
  ``--eval-batches`` batches of the bare model, of the n adapters merged (coefficients 1/n) and folded
  into the weights once, and of the same merge left unfolded (the fused modules' factor path);
- ``eval:paired``: the bare model and the folded merge in one process, their passes alternated.

Reported: step time (median of ``--steps`` after ``--warmup``) and working memory (CUDA: peak
allocated; CPU: peak RSS, reset once the model is built, less the RSS before the model was built, so
that libraries and the interpreter do not count) with ratios to ``limit`` measured in the same run;
merge seconds and peak RSS; evaluation tokens per second (fastest batch) and its ratio to ``eval:base``. Then the
issue's GPU targets (fused step <= 1.15x the limit, peak memory <= 1.1x, evaluation >= 0.95x of the
bare model) and the memory model of the shape (weights, stacked factors).

FusionBench's dense layer-wise AdaMerging is not a case here: it holds the n fine-tuned models as
dense copies (16 x 13.5 GB at 7B, beyond any one GPU); ``bench_fit_step.py`` compares with it at the
sizes where it fits. Neither is lmerge's dense reference (n dense deltas per module: 16 x 13 GB).
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
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ANSWER_TOKENS, LABEL_WORDS, TASK = 2, 2, "task0"
STEP_CASES = ("limit", "fused")
PAIRED = "paired"
EVAL_PAIRED = "eval:paired"
EVAL_CASES = ("eval:base", "eval:folded", "eval:fused")
MERGES = {"task_vector": ("task_vector", {}), "ties": ("ties", {"k": 20})}
# The SVD-family methods, benchmarked once they are registered: case -> (method, parameters).
SVD_FAMILY = {
    "tsv": ("tsv", {}),
    "iso_c": ("iso_c", {}),
    "knots_ties": ("knots_ties", {}),
    "ties:core": ("ties", {"k": 20, "space": "core"}),
}


@dataclass(frozen=True)
class Shape:
    """A benchmark model and workload."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int
    rank: int
    batch: int
    seq: int
    dtype: str
    device: str


SHAPES = {
    "7b": Shape(4096, 32, 11008, 32, 32000, 16, 4, 512, "bfloat16", "cuda"),
    "cpu": Shape(1024, 4, 2752, 16, 4096, 4, 4, 128, "float32", "cpu"),
    "tiny": Shape(64, 2, 172, 4, 256, 2, 2, 16, "float32", "cpu"),
}


def module_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) of each targeted linear of one layer."""
    h, i = shape.hidden, shape.intermediate
    return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h)} | {
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def module_path(target: str) -> str:
    return f"self_attn.{target}" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else f"mlp.{target}"


# ---- data: adapters and a catalog (parent) -----------------------------------------------------------
def generate(root: Path, shape: Shape, n: int) -> None:
    """``root/base/config.json`` (the model's config only), n PEFT adapters in ``root/adapters/task<i>``
    and ``root/catalog.yaml`` (label-token tasks over them; JSON is YAML)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    llama_config(shape).save_pretrained(root / "base")
    dtype = getattr(torch, shape.dtype)
    config = LoraConfig(
        r=shape.rank,
        lora_alpha=2 * shape.rank,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(root / "base"),
    )
    (root / "data.json").write_text(json.dumps([{"text": "a b", "label": "yes"}]))
    tasks = {}
    for index in range(n):
        generator = torch.Generator().manual_seed(1000 + index)
        tensors = {}
        for layer in range(shape.layers):
            for target, (fan_in, fan_out) in module_shapes(shape).items():
                prefix = f"base_model.model.model.layers.{layer}.{module_path(target)}"
                A = torch.randn(shape.rank, fan_in, generator=generator) / fan_in**0.5
                B = torch.randn(fan_out, shape.rank, generator=generator) / shape.rank**0.5
                tensors[f"{prefix}.lora_A.weight"] = A.to(dtype)
                tensors[f"{prefix}.lora_B.weight"] = B.to(dtype)
        target_dir = root / "adapters" / f"task{index}"
        config.save_pretrained(target_dir)
        save_file(tensors, str(target_dir / "adapter_model.safetensors"))
        tasks[f"task{index}"] = {
            "adapter": f"adapters/task{index}",
            "kind": "label_tokens",
            "dataset": {"path": "json", "data_files": {"train": "data.json"}},
            "label_names": ["yes", "no"],
            "prompt": "Question: {text} Answer:",
        }
    (root / "catalog.yaml").write_text(json.dumps({"tasks": tasks}, indent=1))


def llama_config(shape: Shape):  # noqa: ANN201 - transformers is imported lazily
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max(shape.seq, 64),
    )


# ---- one case, in the child process ---------------------------------------------------------------
def build_model(shape: Shape):  # noqa: ANN201
    """The random base model, created directly in the shape's dtype on its device, frozen, in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, shape.dtype))
    try:
        with torch.device(shape.device):
            model = LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False).eval()


def make_batch(shape: Shape) -> dict[str, Any]:
    """A fixed random batch as lmerge's label-token collator makes it, on the device."""
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, shape.vocab, (shape.batch, shape.seq), generator=generator)
    candidates = torch.arange(3, 3 + LABEL_WORDS).unsqueeze(1)
    class_ids = torch.randint(LABEL_WORDS, (shape.batch,), generator=generator)
    input_ids[:, -ANSWER_TOKENS] = candidates[class_ids, 0]
    labels = torch.full_like(input_ids, -100)
    labels[:, -ANSWER_TOKENS:] = input_ids[:, -ANSWER_TOKENS:]
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "class_ids": class_ids,
        "candidates": candidates,
    }
    return {key: value.to(shape.device) for key, value in batch.items()}


def autocast(shape: Shape):  # noqa: ANN201
    """``bf16-mixed`` on CUDA; nothing on a CPU (where the learner turns autocast off too)."""
    import torch

    return torch.autocast(shape.device, dtype=torch.bfloat16, enabled=shape.device == "cuda")


def prepare_limit(shape: Shape, data: Path, n: int):  # noqa: ANN201
    """The bare model; a scalar on the input embeddings is the only trainable tensor."""
    import torch

    from lmerge.learn.adamerging import entropy
    from lmerge.tasks.kinds import get_kind

    model = build_model(shape)
    scale = torch.nn.Parameter(torch.ones((), device=shape.device))
    # Cast back to the embeddings' dtype, so the residual stream stays in the model's dtype as in the fused case.
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out * scale.to(out.dtype))
    optimizer = torch.optim.Adam([scale], lr=1e-3)
    batch = make_batch(shape)

    def step() -> None:
        with autocast(shape):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = entropy(get_kind("label_tokens").predict(logits, batch)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def prepare_fused(shape: Shape, data: Path, n: int):  # noqa: ANN201
    """lmerge's AdaMerging over n adapters, its model built as ``lmerge fit`` builds it."""
    from lightning.pytorch import Trainer

    import lmerge.learn.base
    from lmerge.learn import AdaMerging

    model = build_model(shape)
    # The only departure from a real run: the learner's loader gets the in-memory model.
    lmerge.learn.base.load_model = lambda *args, **kwargs: model
    adapters = [f"task{i}" for i in range(n)]
    model_dtype = "bf16" if shape.dtype == "bfloat16" else "fp32"
    learner = AdaMerging(str(data / "catalog.yaml"), adapters, [TASK], lr=1e-3, model_dtype=model_dtype)
    precision = "bf16-mixed" if shape.device == "cuda" else "32-true"
    trainer = Trainer(accelerator=shape.device, devices=1, precision=precision, logger=False, enable_progress_bar=False)
    learner.trainer = trainer
    with trainer.strategy.tensor_init_context():
        learner.configure_model()
    learner.trainer = None  # its steps run here, outside a fit loop (self.log then only warns)
    learner.train()
    optimizer = learner.configure_optimizers()
    batch = {TASK: make_batch(shape)}

    def step() -> None:
        with autocast(shape):
            loss = learner.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        learner.coefficients.project_()  # what the learner's optimizer_step adds
        optimizer.zero_grad(set_to_none=True)

    return step


def merged(shape: Shape, data: Path, n: int, fold: bool):  # noqa: ANN201
    """The base model with the n adapters merged at 1/n each by lmerge's fused modules, folded or not."""
    from lmerge.adapters import LoraAdapter
    from lmerge.adapters.align import align_keys
    from lmerge.learn.coefficients import Coefficients
    from lmerge.learn.fused import attach

    model = build_model(shape)
    adapters = [LoraAdapter(data / "adapters" / f"task{i}") for i in range(n)]
    keys, _ = align_keys(adapters, "common")
    coefficients = Coefficients(n, 1, "none", 1.0 / n)
    fused = attach(model, adapters, keys, coefficients, lambda key: 0)
    if fold:
        fused.fold()
    return model


def eval_model(shape: Shape, data: Path, n: int, case: str):  # noqa: ANN201
    """The model an evaluation case scores: bare, or the merge folded, or the merge unfolded."""
    return build_model(shape) if case == "eval:base" else merged(shape, data, n, fold=case == "eval:folded")


def forward_pass(shape: Shape, model):  # noqa: ANN001, ANN201
    """One timed evaluation forward over the fixed batch (inference mode, autocast on CUDA)."""
    import torch

    batch = make_batch(shape)

    def forward() -> None:
        with torch.inference_mode(), autocast(shape):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    return forward


def run_eval(shape: Shape, data: Path, n: int, case: str, batches: int) -> dict[str, Any]:
    """Tokens per second of the fastest of ``batches`` forward passes (after one untimed)."""
    baseline = memory(shape)["now_mb"]
    forward = forward_pass(shape, eval_model(shape, data, n, case))
    forward()
    reset_peak(shape)
    times = [timed(shape, forward) for _ in range(batches)]
    tokens = shape.batch * shape.seq
    return {"tokens_per_s": tokens / min(times), "batch_ms": [round(t * 1000, 1) for t in times]} | working(
        shape, baseline
    )


def alternate(shape: Shape, first, second, rounds: int, warmup: int) -> tuple[list[float], list[float]]:  # noqa: ANN001
    """Times of ``first()`` and ``second()`` called in turn, the order flipped every round; warm-up dropped."""
    times: tuple[list[float], list[float]] = ([], [])
    for index in range(warmup + rounds):
        order = [(0, first), (1, second)]
        for slot, call in order if index % 2 else order[::-1]:
            times[slot].append(timed(shape, call))
    return times[0][warmup:], times[1][warmup:]


def run_eval_paired(shape: Shape, data: Path, n: int, batches: int) -> dict[str, Any]:
    """The bare model and the folded merge in one process, their forward passes alternated: the median
    of the per-round throughput ratios (folded over bare)."""
    base = forward_pass(shape, eval_model(shape, data, n, "eval:base"))
    folded = forward_pass(shape, eval_model(shape, data, n, "eval:folded"))
    base_s, folded_s = alternate(shape, base, folded, batches, 1)
    ratio = statistics.median(b / f for b, f in zip(base_s, folded_s, strict=True))
    return {"case": EVAL_PAIRED, "ratio": ratio, "base_ms": statistics.median(base_s) * 1000} | {
        "folded_ms": statistics.median(folded_s) * 1000
    }


def run_merge_case(shape: Shape, data: Path, n: int, case: str) -> dict[str, Any]:
    import shutil

    from lmerge.merge.config import MergeConfig, SaveConfig
    from lmerge.pipeline import run_merge

    method, params = {**MERGES, **SVD_FAMILY}[case.removeprefix("merge:")]
    out = Path(tempfile.mkdtemp(prefix="merge_", dir=data))
    adapters = [str(data / "adapters" / f"task{i}") for i in range(n)]
    config = MergeConfig(adapters=adapters, method=method, method_params=params, save=SaveConfig(), output_dir=str(out))
    reset_peak(Shape(**{**asdict(shape), "device": "cpu"}))
    started = time.perf_counter()
    run_merge(config)
    seconds = time.perf_counter() - started
    saved = sum(path.stat().st_size for path in out.rglob("*.safetensors")) / 2**20
    shutil.rmtree(out)
    return {"seconds": seconds, "saved_mb": saved, "peak_mb": rss_mb("VmHWM"), "device_note": "static engine: CPU"}


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak(shape: Shape) -> None:
    """Reset the peak-memory mark: CUDA's allocator, or the process's peak RSS (after malloc_trim)."""
    import ctypes

    import torch

    if shape.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")


def memory(shape: Shape) -> dict[str, float]:
    """Peak memory since the reset, in MB (CUDA: allocated tensors; CPU: resident set)."""
    import torch

    if shape.device == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "now_mb": torch.cuda.memory_allocated() / 2**20}
    return {"peak_mb": rss_mb("VmHWM"), "now_mb": rss_mb("VmRSS")}


def sync(shape: Shape) -> None:
    import torch

    if shape.device == "cuda":
        torch.cuda.synchronize()


def timed(shape: Shape, call) -> float:  # noqa: ANN001
    """Seconds of one ``call()`` (the device synchronized before and after)."""
    sync(shape)
    started = time.perf_counter()
    call()
    sync(shape)
    return time.perf_counter() - started


def working(shape: Shape, baseline: float) -> dict[str, float]:
    """Peak memory since the reset, and the working memory: that peak over ``baseline`` (on a CPU, what
    the interpreter and libraries held before the model was built; CUDA counts tensors only)."""
    peak = memory(shape)["peak_mb"]
    return {"peak_mb": peak, "working_mb": peak - baseline}


def load_libraries() -> None:
    """Everything a case imports, before the baseline memory is read, so it is the same in every case."""
    import lightning.pytorch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import lmerge.learn.adamerging  # noqa: F401
    import lmerge.learn.fused  # noqa: F401


def run_case(case: str, shape: Shape, data: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Build case ``case`` and measure it."""
    import torch

    warnings.filterwarnings("ignore")
    if case.startswith("merge:"):
        return {"case": case, **run_merge_case(shape, data, n, case)}
    load_libraries()
    if case == EVAL_PAIRED:
        return run_eval_paired(shape, data, n, args.eval_batches)
    if case.startswith("eval:"):
        return {"case": case, **run_eval(shape, data, n, case, args.eval_batches)}
    if case == PAIRED:
        steps = prepare_limit(shape, data, n), prepare_fused(shape, data, n)
        limit, fused = alternate(shape, *steps, args.steps, args.warmup)
        ratio = statistics.median(f / b for f, b in zip(fused, limit, strict=True))
        return {"case": PAIRED, "step_ms": statistics.median(fused) * 1000} | {
            "limit_ms": statistics.median(limit) * 1000,
            "ratio": ratio,
        }
    baseline = memory(shape)["now_mb"]
    started = time.perf_counter()
    step = (prepare_limit if case == "limit" else prepare_fused)(shape, data, n)
    build_s = time.perf_counter() - started
    reset_peak(shape)
    times = [timed(shape, step) for _ in range(args.warmup + args.steps)]
    result = {"case": case, "step_ms": statistics.median(times[args.warmup :]) * 1000, "build_s": build_s}
    result |= {"steps_ms": [round(t * 1000, 1) for t in times], **working(shape, baseline)}
    return result | {"torch_threads": torch.get_num_threads()}


# ---- the parent ------------------------------------------------------------------------------------
def measure(case: str, shape_name: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, __file__, "--case", case, "--shape", shape_name, "--n", str(args.n), "--data", str(data)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--eval-batches", str(args.eval_batches)]
    try:
        child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {args.timeout} s"}
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
        return {"case": case, "error": lines[-1]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]], shape: Shape) -> str:
    """The results as a markdown table; ratios against ``limit`` and ``eval:base`` of the same run."""
    got = {r["case"]: r for r in results if "error" not in r}
    unit = "CUDA peak allocated MB" if shape.device == "cuda" else "working memory MB (peak RSS over start)"
    lines = [f"| case | time | {unit} | × limit (time) | × limit (memory) | tokens/s | × bare |", "|---|" + "---:|" * 6]
    limit, base = got.get("limit"), got.get("eval:base")
    for r in results:
        case = r["case"]
        if "error" in r:
            cells = f"error: {r['error'][:100]} | | | | | "
        elif case == PAIRED:
            cells = f"{r['step_ms']:.0f} ms/step (limit {r['limit_ms']:.0f}), alternated | | {r['ratio']:.2f} | | | "
        elif case == EVAL_PAIRED:
            cells = f"{r['folded_ms']:.0f} ms/batch (bare {r['base_ms']:.0f}), alternated | | | | | {r['ratio']:.2f}"
        elif case in STEP_CASES:
            ratios = (
                f"{r['step_ms'] / limit['step_ms']:.2f} | {r['working_mb'] / limit['working_mb']:.2f}"
                if limit
                else " | "
            )
            cells = f"{r['step_ms']:.0f} ms/step | {r['working_mb']:.0f} | {ratios} | | "
        elif case.startswith("eval:"):
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else ""
            cells = f"{min(r['batch_ms']):.0f} ms/batch | {r['working_mb']:.0f} | | | {r['tokens_per_s']:.0f} | {ratio}"
        else:
            cells = f"{r['seconds']:.1f} s (static engine, CPU) | {r['peak_mb']:.0f} (peak RSS) | | | | "
        lines.append(f"| {case} | {cells} |")
    return "\n".join(lines)


def check_targets(results: list[dict[str, Any]]) -> list[str]:
    """The issue's GPU targets as PASS/FAIL lines (those the results decide)."""
    got = {r["case"]: r for r in results if "error" not in r}
    lines = []

    def verdict(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}: {text}")

    limit, fused, base, folded = (got.get(c) for c in ("limit", "fused", "eval:base", "eval:folded"))
    if limit and fused:
        time_ratio, memory_ratio = fused["step_ms"] / limit["step_ms"], fused["working_mb"] / limit["working_mb"]
        verdict(time_ratio <= 1.15, f"fused step {time_ratio:.2f}x the limit (<= 1.15x)")
        verdict(memory_ratio <= 1.1, f"fused peak memory {memory_ratio:.2f}x the limit's (<= 1.1x)")
    if PAIRED in got:
        ratio = got[PAIRED]["ratio"]
        verdict(ratio <= 1.15, f"fused step, alternated with the limit: {ratio:.2f}x (<= 1.15x)")
    if base and folded:
        ratio = folded["tokens_per_s"] / base["tokens_per_s"]
        verdict(ratio >= 0.95, f"folded evaluation {ratio:.2f}x the bare model's throughput (>= 0.95x)")
    if EVAL_PAIRED in got:
        ratio = got[EVAL_PAIRED]["ratio"]
        verdict(ratio >= 0.95, f"folded evaluation, alternated with the bare model: {ratio:.2f}x (>= 0.95x)")
    return lines


def memory_model(shape: Shape, n: int) -> str:
    """Weights and stacked factors of the shape, from its dimensions."""
    item = 2 if shape.dtype == "bfloat16" else 4
    h, v = shape.hidden, shape.vocab
    per_layer = sum(fan_in * fan_out for fan_in, fan_out in module_shapes(shape).values())
    weights = shape.layers * per_layer + 2 * v * h
    factors = n * shape.rank * shape.layers * sum(a + b for a, b in module_shapes(shape).values())
    return (
        f"memory model ({shape.dtype}): base weights {weights * item / 2**20:.0f} MB; stacked factors "
        f"n r (in + out) over the {7 * shape.layers} modules {factors * item / 2**20:.0f} MB "
        f"({factors / weights:.1%} of the weights); coefficients {n * shape.layers * 4} bytes"
    )


def default_cases() -> list[str]:
    from lmerge.methods import METHODS

    merges = [f"merge:{name}" for name in MERGES]
    for case, (method, params) in SVD_FAMILY.items():
        if method in METHODS and set(params) <= set(METHODS[method].param_names):
            merges.append(f"merge:{case}")
    return [*STEP_CASES, PAIRED, *merges, *EVAL_CASES, EVAL_PAIRED]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["auto", *SHAPES], default="auto")
    parser.add_argument("--n", type=int, default=16, help="adapters")
    parser.add_argument("--cases", nargs="+", help="default: every step, merge and evaluation case")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median counts)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--eval-batches", type=int, default=4, help="timed forward passes per evaluation case")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per case before it counts as failed")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, SHAPES[args.shape], args.data, args.n, args)))
        return

    import torch

    name = args.shape if args.shape != "auto" else ("7b" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[name]
    cases = args.cases or default_cases()
    device = torch.cuda.get_device_name() if shape.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"shape {name}: {shape}; n={args.n}; {device}; torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_llm_") as tmp:
        generate(Path(tmp), shape, args.n)
        print(f"{args.n} adapters written in {time.perf_counter() - started:.1f} s", flush=True)
        for case in cases:
            result = measure(case, name, Path(tmp), args)
            results.append(result)
            print(f"  {case}: {json.dumps({k: v for k, v in result.items() if k != 'case'})}", flush=True)
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s\n")
    print(table(results, shape))
    print()
    for line in [*check_targets(results), memory_model(shape, args.n)]:
        print(line)
    if args.out:
        payload = {"shape": name, "dims": asdict(shape), "n": args.n, "device": device, "results": results}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
