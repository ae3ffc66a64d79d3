"""Benchmark lmerge's merges against PEFT's ``add_weighted_adapter`` and the dense-delta floor.

    .venv/bin/python scripts/bench_merge.py --n 2 4 8 [--cases ...] [--repeat 1] [--skip-slow-peers]
        [--slow-n 8] [--scaling-layers 4 8 16] [--shape llama-105m] [--out results.json]

A Llama-shaped random model (``--shape``: by default hidden 1024, intermediate 2816, 8 layers;
``llama3-8b``: Llama-3-8B's layer shapes, two of its 32 layers) and n random LoRA adapters (r=16
on q, k, v, o, gate, up, down: 56 modules, 14 at ``llama3-8b``) are generated once per run in a
temporary directory. Every case then runs in its own process (this script with ``--case``),
which prints one JSON line: the wall time of the timed part only (imports and set-up
excluded), its CPU time (user + system, all threads: on a shared machine the steadier measure
of the work), its minor page faults (fresh memory, microseconds each in a virtual machine), the
RSS right before it and the peak RSS during it (VmHWM, reset first, after freed heap is given
back), and how much of the RSS growth is library code paged in by the process's first call of it
(``RssFile``: shared, clean pages of mapped files, 9 MB for the linear save, 15-20 MB for a merge
that calls LAPACK; the rest is memory the merge allocated). With ``--repeat``, the cases run in
rounds, each case once per round: a case's fastest run gives its times, and its run of median
allocated memory (RSS growth less library code) its memory columns. Its ratio to the linear save
is also given paired by round, the median over rounds of its time over the linear save's in the
same round: the fastest runs of two cases may come from different spells of the machine's load.

- ``lmerge:<method>[:core][:full][:r<rank>]``: one ``run_merge`` call (load, merge, save as a
  LoRA or full model); ``:core`` runs a dense method in core space, ``:r16`` saves at
  ``save.rank`` 16 (``lmerge:task_vector:r16``: the sum's best rank-16 approximation, computed
  from the factors, against PEFT's ``svd`` type, a dense SVD of it). The exact low-rank methods
  (tsv, iso_c, iso_cts, knots_ties, knots_dare) and ties/dare in core space save exact LoRAs; the table gives
  each case's time over the exact linear save (``lmerge:task_vector``), over weight-space
  ``lmerge:ties`` and over its PEFT peer at the same n, in wall seconds and (steadier on a shared
  machine) in CPU seconds. ``--n 8 16 32`` shows how each grows with the number of adapters.
- ``peft:<combination_type>``: ``add_weighted_adapter`` on a PeftModel holding all n adapters,
  plus ``save_pretrained`` of the result (PEFT's ``linear`` needs equal ranks, as here).
- ``floor``: every dense delta ``scaling * B @ A`` built once from the safetensors files,
  the least work any dense merge must do (each delta's memory reused by the next: the GEMMs alone).
- ``floor:stacked``: the same deltas written into one new ``[n, out, in]`` tensor per module, the
  least a dense method that holds a module's task vectors at once must do (fresh memory, so
  page faults included).

With ``--scaling-layers``, the same adapters are also written for models of those depths and
``lmerge:ties`` and ``lmerge:task_vector`` merge ``--scaling-n`` of them at each depth: the peak
RSS should stay flat as the model grows, since modules are merged one at a time.

PEFT's ``*_svd`` types take one to two minutes each (a full SVD per module), so they run only
at the n values of ``--slow-n`` (default: the largest ``--n``), or not at all with
``--skip-slow-peers``. The default cases leave out the lmerge methods weighted, uniform_delta,
uniform_scalar_delta and weighted_delta; name them in ``--cases`` to run them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VOCAB = 256
RANK, ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DENSITY = 0.2
FLOOR = "floor"
STACKED_FLOOR = "floor:stacked"


@dataclass(frozen=True)
class Shape:
    """The dimensions of a Llama-shaped model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int

    def module_shapes(self) -> list[tuple[int, int]]:
        """``(out, in)`` of one layer's q, k, v, o, gate, up and down projections."""
        kv = self.kv_heads * self.hidden // self.heads
        h, i = self.hidden, self.intermediate
        return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


SHAPES = {
    "llama-105m": Shape(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16),
    # Llama-3-8B's q and o (4096 x 4096), k and v (1024 x 4096: grouped-query attention) and MLP
    # (14336 wide), in two of its 32 layers: 14 modules as a user merges them, with a 1.7 GB base.
    "llama3-8b": Shape(hidden=4096, intermediate=14336, layers=2, heads=32, kv_heads=8),
}
"""The model shapes ``--shape`` offers."""


@dataclass(frozen=True)
class Case:
    """One benchmarked operation; ``peer`` names the PEFT case an lmerge case is compared with."""

    name: str
    method: str = ""
    params: Callable[[int], dict[str, Any]] = field(default=lambda n: {})
    save: str = "lora"
    peer: str | None = None
    slow: bool = False
    default: bool = True
    rank: int | None = None
    """``save.rank`` (None: unset, so dense merges are saved at the largest input rank, RANK)."""


def _lmerge(
    method: str, peer: str | None, save: str = "lora", default: bool = True, rank: int | None = None, **params: Any
) -> Case:
    """An lmerge case with fixed method parameters (a dense method in core space is
    ``<method>:core``, one saved at ``save.rank`` r is ``<method>:r<r>``)."""
    space = f":{params['space']}" if params.get("space", "weight") != "weight" else ""
    suffix = ("" if save == "lora" else f":{save}") + ("" if rank is None else f":r{rank}")
    name = f"lmerge:{method}{space}{suffix}"
    return Case(name, method, lambda n: dict(params), save, peer, default=default, rank=rank)


def _peft(combination: str, default: bool = True) -> Case:
    """A PEFT ``add_weighted_adapter`` case; the ``*svd`` types are slow."""
    return Case(f"peft:{combination}", combination, slow=combination.endswith("svd"), default=default)


CASES = {
    case.name: case
    for case in [
        Case(FLOOR),
        Case(STACKED_FLOOR),
        _lmerge("uniform", "peft:linear"),
        _lmerge("task_vector", "peft:cat"),
        _lmerge("task_vector", None, save="full"),
        _lmerge("task_vector", "peft:svd", rank=RANK),  # the sum's best rank-16 approximation
        Case(
            "lmerge:weighted_delta_n",
            "weighted_delta_n",
            lambda n: {"weights": [1.0 / n] * n},
            peer="peft:cat",
        ),
        _lmerge("ties", "peft:ties_svd", k=100 * DENSITY),
        _lmerge("ties", None, save="full", k=100 * DENSITY),
        _lmerge("dare", "peft:dare_ties_svd", drop_rate=1 - DENSITY),
        _lmerge("dare_ties", "peft:dare_ties_svd", drop_rate=1 - DENSITY),
        _lmerge("magnitude_prune", "peft:magnitude_prune_svd", k=100 * DENSITY),
        _lmerge("ties", "peft:ties_svd", k=100 * DENSITY, space="core"),
        _lmerge("dare", "peft:dare_ties_svd", drop_rate=1 - DENSITY, space="core"),
        _lmerge("tsv", "peft:ties_svd"),
        _lmerge("iso_c", "peft:ties_svd"),
        _lmerge("iso_cts", "peft:ties_svd"),
        _lmerge("knots_ties", "peft:ties_svd", k=100 * DENSITY),
        _lmerge("knots_dare", "peft:dare_ties_svd", drop_rate=1 - DENSITY),
        Case(
            "lmerge:weighted",
            "weighted",
            lambda n: {"weights": [1.0 / n] * n},
            peer="peft:linear",
            default=False,
        ),
        _lmerge("uniform_delta", "peft:cat", default=False),
        _lmerge("uniform_scalar_delta", "peft:cat", default=False),
        _lmerge("weighted_delta", "peft:cat", default=False),
        _peft("cat"),
        _peft("linear"),
        _peft("svd"),
        _peft("ties_svd"),
        _peft("dare_ties_svd"),
        _peft("magnitude_prune_svd"),
    ]
}


# ---- data ------------------------------------------------------------------------------------
def generate(root: Path, n_adapters: int, shape: Shape) -> None:
    """Save the random base model of ``shape`` to ``root/base`` and ``n_adapters`` random LoRA adapters
    (non-zero A and B, one seed each) to ``root/adapters/t<i>``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    model.name_or_path = str(root / "base")  # becomes the adapters' base_model_name_or_path
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations PEFT still calls
        peft_model = get_peft_model(model, lora)
    layers = [module for module in peft_model.modules() if isinstance(module, LoraLayer)]
    assert len(layers) == shape.layers * len(TARGETS)
    for i in range(n_adapters):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in layers:
                for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                    weight.copy_(torch.randn(weight.shape, generator=generator) / math.sqrt(weight.shape[1]))
        peft_model.save_pretrained(root / "adapters" / adapter_name(i))


def adapter_dirs(root: Path, n: int) -> list[Path]:
    """The first ``n`` generated adapters."""
    return [root / "adapters" / adapter_name(i) for i in range(n)]


def adapter_name(i: int) -> str:
    """Adapter i's folder name: short, as lmerge joins the names into the merged folder's name,
    which stays under 200 bytes (``task0_task1_..._task31`` would not)."""
    return f"t{i}"


def deepen(source: Path, root: Path, n_adapters: int, layers: int) -> None:
    """Write ``n_adapters`` random adapters for a model of ``layers`` layers to
    ``root/adapters/t<i>``, with the configuration of the generated adapters in ``source``
    (no base model: saving a merge as a LoRA does not load it)."""
    import torch
    from safetensors.torch import load_file, save_file

    template = load_file(str(source / "adapters" / adapter_name(0) / "adapter_model.safetensors"))
    layer_zero = {name: t.shape for name, t in template.items() if ".layers.0." in name}
    for i in range(n_adapters):
        generator = torch.Generator().manual_seed(i)
        tensors = {
            name.replace(".layers.0.", f".layers.{layer}."): torch.randn(shape, generator=generator)
            / math.sqrt(shape[1])
            for layer in range(layers)
            for name, shape in layer_zero.items()
        }
        target = root / "adapters" / adapter_name(i)
        target.mkdir(parents=True)
        shutil.copy(source / "adapters" / adapter_name(0) / "adapter_config.json", target)
        save_file(tensors, str(target / "adapter_model.safetensors"))


# ---- one case, in the child process ----------------------------------------------------------
def memory_mb(field: str) -> float:
    """``VmRSS`` (resident now), ``VmHWM`` (peak resident) or ``RssFile`` (resident pages of mapped
    files: the libraries' code) of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Give freed heap back to the OS (glibc's ``malloc_trim``), then reset the peak-RSS mark
    (Linux >= 4.0) so that ``VmHWM`` covers only what follows.

    ``ru_maxrss`` cannot be reset, and in a child it starts at the parent's peak (the kernel
    keeps the pre-exec memory's high-water mark), so it would show the parent's model.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")


def prepare_floor(adapters: list[Path], stacked: bool = False) -> Callable[[], None]:
    """The floor: read every module's A and B from each adapter file and build its dense delta,
    each one alone (its memory reused by the next), or with ``stacked`` into one new
    ``[n, out, in]`` tensor per module, as a dense method that holds a module's task vectors at
    once (peft's ``ties``, FusionBench) must."""
    import torch
    from safetensors import safe_open

    def run() -> None:
        handles = [safe_open(str(path / "adapter_model.safetensors"), framework="pt") for path in adapters]
        configs = [json.loads((path / "adapter_config.json").read_text()) for path in adapters]
        scalings = [config["lora_alpha"] / config["r"] for config in configs]
        a_names = [name for name in handles[0].keys() if name.endswith(".lora_A.weight")]
        for a_name in a_names:
            b_name = a_name.replace(".lora_A.", ".lora_B.")
            if stacked:
                B, A = handles[0].get_tensor(b_name), handles[0].get_tensor(a_name)
                stack = torch.empty(len(handles), B.shape[0], A.shape[1])
                for i, (handle, scaling) in enumerate(zip(handles, scalings, strict=True)):
                    torch.mm(handle.get_tensor(b_name) * scaling, handle.get_tensor(a_name), out=stack[i])
                del stack
                continue
            for handle, scaling in zip(handles, scalings, strict=True):
                (handle.get_tensor(b_name) * scaling) @ handle.get_tensor(a_name)  # built, then dropped

    return run


def prepare_lmerge(case: Case, adapters: list[Path], out: Path) -> Callable[[], None]:
    """One ``run_merge`` call, saving under ``out``."""
    # lmerge imports transformers lazily, to check adapters against their base's layers (and to save
    # full weights): a once-per-process import of seconds, kept out of the timing; the check's
    # config read and model build on the meta device stay in it.
    import transformers.models.llama.modeling_llama  # noqa: F401

    from lmerge.merge.config import MergeConfig, SaveConfig
    from lmerge.pipeline import run_merge

    config = MergeConfig(
        adapters=[str(path) for path in adapters],
        method=case.method,
        method_params=case.params(len(adapters)),
        save=SaveConfig(format=case.save, rank=case.rank),
        output_dir=str(out),
    )
    return lambda: run_merge(config)


def prepare_peft(case: Case, adapters: list[Path], out: Path) -> Callable[[], None]:
    """Load the base model with all adapters; the timed part merges them and saves the result."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((adapters[0] / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        str(adapters[0]),
        adapter_name="task0",
    )
    names = [f"task{i}" for i in range(len(adapters))]
    for name, path in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
    density = DENSITY if case.method.endswith("_svd") and case.method != "svd" else None

    def run() -> None:
        weights = [1.0] * len(names)
        model.add_weighted_adapter(names, weights, "merged", combination_type=case.method, density=density)
        model.save_pretrained(str(out), selected_adapters=["merged"])

    return run


def run_case(name: str, n: int, data: Path) -> dict[str, Any]:
    """Set up case ``name`` for the first ``n`` adapters, then time it alone."""
    import torch

    case = CASES[name]
    adapters = adapter_dirs(data, n)
    out = Path(tempfile.mkdtemp(prefix="out_", dir=data))
    if name in (FLOOR, STACKED_FLOOR):
        fn = prepare_floor(adapters, stacked=name == STACKED_FLOOR)
    elif name.startswith("lmerge:"):
        fn = prepare_lmerge(case, adapters, out)
    else:
        fn = prepare_peft(case, adapters, out)
    reset_peak_rss()
    baseline, file_before = memory_mb("VmRSS"), memory_mb("RssFile")
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu_started = time.process_time()
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    peak, file_grown = memory_mb("VmHWM"), memory_mb("RssFile") - file_before
    saved = sum(path.stat().st_size for path in out.rglob("*.safetensors")) / 2**20
    shutil.rmtree(out)
    return {
        "case": name,
        "n": n,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "page_faults": faults,
        "baseline_mb": baseline,
        "peak_mb": peak,
        "file_backed_mb": file_grown,
        "saved_mb": saved,
        "torch_threads": torch.get_num_threads(),
    }


# ---- the parent: run every case in its own process and print the table -----------------------
def run_once(name: str, n: int, data: Path) -> dict[str, Any]:
    """One run of one case in a fresh process."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, __file__, "--case", name, "--n", str(n), "--data", str(data)]
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
        return {"case": name, "n": n, "error": lines[-1]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def measure(name: str, n: int, data: Path, repeat: int) -> dict[str, Any]:
    """``repeat`` runs of one case, each in a fresh process, summed up as :func:`summary`."""
    return measure_rounds([name], n, data, repeat)[0]


def measure_rounds(names: list[str], n: int, data: Path, repeat: int) -> list[dict[str, Any]]:
    """``repeat`` runs of each case (:func:`summary`), in rounds that run every case once: a busy
    spell of a shared machine then slows all cases of a round alike, not one case's every run."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(repeat):
        for name in names:
            if not runs[name] or "error" not in runs[name][-1]:
                runs[name].append(run_once(name, n, data))
    return [next((run for run in runs[name] if "error" in run), None) or summary(runs[name]) for name in names]


MEMORY_FIELDS = ("baseline_mb", "peak_mb", "file_backed_mb")


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run, with the memory fields of the run of median allocated memory (its RSS
    growth less library code). The fastest run is the one the machine's other load slowed least;
    the memory a fresh process reaches varies from run to run by several MB either way (10 at
    Llama-3-8B's shapes, whichever run is fastest), which the median steadies (of an even
    number of runs, the lower middle one)."""
    fastest = min(runs, key=lambda run: run["seconds"])
    by_memory = sorted(runs, key=lambda run: run["peak_mb"] - run["baseline_mb"] - run["file_backed_mb"])
    median = by_memory[(len(by_memory) - 1) // 2]
    rounds = [run["seconds"] for run in runs]
    return {**fastest, **{field: median[field] for field in MEMORY_FIELDS}, "round_seconds": rounds}


def median_round_ratio(case: dict[str, Any], reference: dict[str, Any]) -> float | None:
    """The median over rounds of ``case``'s seconds over ``reference``'s in the same round (the
    lower middle one of an even count): a ratio of runs side by side, which a busy spell of the
    machine slows alike, where the fastest runs of two cases may come from different spells."""
    pairs = list(zip(case.get("round_seconds", []), reference.get("round_seconds", []), strict=False))
    if not pairs:
        return None
    ratios = sorted(seconds / other for seconds, other in pairs)
    return ratios[(len(ratios) - 1) // 2]


LINEAR_SAVE = "lmerge:task_vector"
"""The exact linear save: what an exact low-rank merge is measured against."""
WEIGHT_TIES = "lmerge:ties"


def table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table; ratios are this case's seconds over the reference's (the
    floors, the exact linear save, weight-space ties and the PEFT peer, at the same n)."""
    seconds = {(r["case"], r["n"]): r["seconds"] for r in results if "error" not in r}
    cpu = {(r["case"], r["n"]): r["cpu_seconds"] for r in results if "error" not in r}
    by_case = {(r["case"], r["n"]): r for r in results if "error" not in r}
    lines = [
        "| case | n | seconds | CPU s | peak RSS MB | Δ RSS MB | of it library code MB | × floor | × stacked floor "
        "| × linear save | × linear save, median of rounds | × ties | CPU × linear save | CPU × ties | PEFT peer "
        "| × peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]

    def round_ratio(r: dict[str, Any]) -> str:
        reference = by_case.get((LINEAR_SAVE, r["n"]))
        paired = median_round_ratio(r, reference) if reference else None
        return f"{paired:.2f}" if paired is not None else ""

    def ratio(r: dict[str, Any], reference: str | None, digits: int = 2, by: str = "seconds") -> str:
        other = (seconds if by == "seconds" else cpu).get((reference, r["n"]))
        return f"{r[by] / other:.{digits}f}" if other else ""

    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['n']} | error: {r['error'][:100]} |" + " |" * 13)
            continue
        peer = CASES[r["case"]].peer
        cells = [
            r["case"],
            str(r["n"]),
            f"{r['seconds']:.3f}",
            f"{r['cpu_seconds']:.2f}",
            f"{r['peak_mb']:.0f}",
            f"{r['peak_mb'] - r['baseline_mb']:+.0f}",
            f"{r['file_backed_mb']:.0f}",
            ratio(r, FLOOR),
            ratio(r, STACKED_FLOOR),
            ratio(r, LINEAR_SAVE),
            round_ratio(r),
            ratio(r, WEIGHT_TIES, 3),
            ratio(r, LINEAR_SAVE, by="cpu_seconds"),
            ratio(r, WEIGHT_TIES, 3, by="cpu_seconds"),
            peer.removeprefix("peft:") if peer else "",
            ratio(r, peer, 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def delta_sizes_mb(n: int, shape: Shape, layers: int | None = None) -> tuple[float, float]:
    """float32 MB of the n dense deltas of the largest module, and of every module (of ``layers``
    layers, default the shape's)."""
    shapes = shape.module_shapes()
    layers = shape.layers if layers is None else layers
    largest = max(rows * cols for rows, cols in shapes)
    every = layers * sum(rows * cols for rows, cols in shapes)
    return n * largest * 4 / 2**20, n * every * 4 / 2**20


SCALING_CASES = ("lmerge:task_vector", "lmerge:ties")


def scaling(data: Path, depths: list[int], n: int, repeat: int, shape: Shape) -> str:
    """Merge n adapters of models of each depth in ``depths``; the table of time and peak RSS.

    The merge is held in memory until it is written, so the peak may grow by the saved size
    (task_vector saves rank n*r); the rest, one module's working set, should not grow."""
    lines = [
        f"| case (n={n}) | layers | seconds | peak RSS MB | Δ RSS MB | saved LoRA MB | all modules' deltas MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for layers in depths:
        root = data / f"layers{layers}"
        deepen(data, root, n, layers)
        every = delta_sizes_mb(n, shape, layers)[1]
        for name in SCALING_CASES:
            r = measure(name, n, root, repeat)
            if "error" in r:
                lines.append(f"| {name} | {layers} | error: {r['error'][:100]} | | | | |")
                continue
            cells = [name, str(layers), f"{r['seconds']:.3f}", f"{r['peak_mb']:.0f}"]
            cells += [f"{r['peak_mb'] - r['baseline_mb']:+.0f}", f"{r['saved_mb']:.0f}", f"{every:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
            print(f"  layers={layers} {name}: {r['seconds']:.3f} s, peak {r['peak_mb']:.0f} MB", flush=True)
        shutil.rmtree(root)
    return "\n".join(lines)


def main() -> None:
    """Run the cases (or, with ``--case``, one case in this process) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8], help="adapter counts")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="default: see the module doc")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of every case: the fastest run's times, the median run's memory"
    )
    parser.add_argument("--skip-slow-peers", action="store_true", help="skip PEFT's *_svd types")
    parser.add_argument("--slow-n", type=int, nargs="+", help="n for PEFT's *_svd types (default: max --n)")
    parser.add_argument("--scaling-layers", type=int, nargs="*", default=[], help="model depths for the scaling check")
    parser.add_argument("--scaling-n", type=int, default=4, help="adapters merged in the scaling check")
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-105m", help="the model's dimensions")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.n[0], args.data)))
        return

    import torch

    names = args.cases or [name for name, case in CASES.items() if case.default]
    slow_n = set() if args.skip_slow_peers else set(args.slow_n or [max(args.n)])
    shape = SHAPES[args.shape]
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    print("machine: {cpus} CPUs, torch {torch}, {torch_threads} torch threads".format(**machine))
    print(f"model: {args.shape} ({shape})")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        data = Path(tmp)
        started = time.perf_counter()
        generate(data, max(args.n + ([args.scaling_n] if args.scaling_layers else [])), shape)
        elapsed = time.perf_counter() - started
        print(f"generated the model and {max(args.n)} adapters in {elapsed:.1f} s", flush=True)
        for n in args.n:
            measured = [name for name in names if not CASES[name].slow or n in slow_n]
            for result in measure_rounds(measured, n, data, args.repeat):
                results.append(result)
                shown = result.get("error") or f"{result['seconds']:.3f} s, peak {result['peak_mb']:.0f} MB"
                print(f"  n={n} {result['case']}: {shown}", flush=True)
        depths = scaling(data, args.scaling_layers, args.scaling_n, args.repeat, shape) if args.scaling_layers else ""
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s\n")
    print(table(results))
    for n in args.n:
        module, every = delta_sizes_mb(n, shape)
        print(f"n={n}: dense deltas of the largest module {module:.0f} MB, of all modules {every:.0f} MB")
    if depths:
        print(f"\nScaling with the model's depth:\n\n{depths}")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "shape": args.shape, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
