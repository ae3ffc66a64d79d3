"""The single-task baseline cache is keyed by everything its number depends on: change the task's
data, its spec, the eval subset, the adapter's config or head, the tokenizer, the base model or the
scoring code, and `lmerge evaluate` computes the baseline again; change nothing and it is reused.
A sweep's stored scores are a cache too: resumed or warm-started after such a change, it measures
its points again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import lmerge.evaluation.baseline_key as baseline_key
import lmerge.sweep.run as sweep_run
from lmerge.__main__ import main
from lmerge.evaluation.evaluate import Evaluator


@pytest.fixture
def world(zoo, tasks, tmp_path) -> dict[str, Path]:
    """A private copy of the BERT base model, tasks alpha's and beta's adapters, their data and a
    catalog over them."""
    base = Path(shutil.copytree(zoo["bert"], tmp_path / "bert"))
    entries, adapters, tests = {}, {}, {}
    for task, original in (("alpha", "bert_a"), ("beta", "bert_b")):
        entry = yaml.safe_load(tasks.read_text())["tasks"][task]
        adapter = Path(shutil.copytree(zoo[original], tmp_path / f"{task}_adapter"))
        edit_json(adapter / "adapter_config.json", base_model_name_or_path=str(base))
        files = {}
        for split, name in entry["dataset"]["data_files"].items():
            files[split] = str(shutil.copy(tasks.parent / name, tmp_path / name))
        entries[task] = {**entry, "adapter": str(adapter), "dataset": {"path": "json", "data_files": files}}
        adapters[task], tests[task] = adapter, Path(files["test"])
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": entries}))
    return {"base": base, "adapter": adapters["alpha"], "catalog": catalog, "test": tests["alpha"], "root": tmp_path}


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_catalog(world, **changes) -> None:
    data = yaml.safe_load(world["catalog"].read_text())
    data["tasks"]["alpha"].update(changes)
    world["catalog"].write_text(yaml.safe_dump(data))


def change_data(world, monkeypatch) -> list[str]:
    rows = json.loads(world["test"].read_text())
    rows[0]["label"] = next(label for label in ("sports", "music") if label != rows[0]["label"])
    world["test"].write_text(json.dumps(rows))
    return []


def change_head(world, monkeypatch) -> list[str]:
    weights = world["adapter"] / "adapter_model.safetensors"
    tensors = load_file(weights)
    head = next(name for name in tensors if "classifier" in name and name.endswith("weight"))
    tensors[head] = tensors[head].flip(0).contiguous()
    save_file(tensors, weights)
    return []


def change_scoring_version(world, monkeypatch) -> list[str]:
    monkeypatch.setattr(baseline_key, "SCORING_VERSION", baseline_key.SCORING_VERSION + 1)
    return []


def change_lmerge_version(world, monkeypatch) -> list[str]:
    real = baseline_key.package_version
    monkeypatch.setattr(
        baseline_key, "package_version", lambda package: "99.0" if package == "lmerge" else real(package)
    )
    return []


CHANGES = {
    "data file": change_data,
    "task spec: max_length": lambda w, m: edit_catalog(w, max_length=7) or [],
    "task spec: label order": lambda w, m: edit_catalog(w, label_names=["music", "sports", "science"]) or [],
    "eval subset": lambda w, m: ["--eval_subset", "{max_samples: 12, seed: 3}"],
    "adapter lora_alpha": lambda w, m: edit_json(w["adapter"] / "adapter_config.json", lora_alpha=16) or [],
    "adapter head": change_head,
    "tokenizer": lambda w, m: edit_json(w["base"] / "tokenizer_config.json", model_max_length=24) or [],
    "base model": lambda w, m: edit_json(w["base"] / "config.json", layer_norm_eps=1e-5) or [],
    "scoring version": change_scoring_version,
    "lmerge version": change_lmerge_version,
}


def test_every_input_of_a_baseline_is_in_its_cache_key(world, monkeypatch, capsys):
    scored = []
    original = Evaluator.score
    monkeypatch.setattr(Evaluator, "score", lambda self, task, head: scored.append(1) or original(self, task, head))

    def baseline(extra: list[str]) -> str:
        argv = ["evaluate", "--catalog", str(world["catalog"]), "--eval_tasks", "[alpha]", *extra]
        assert main([*argv, "--output_dir", str(world["root"] / "out")]) == 0
        return capsys.readouterr().out

    first = baseline([])
    assert len(scored) == 1
    assert baseline([]) == first and len(scored) == 1  # unchanged: reused
    for name, change in CHANGES.items():
        extra = change(world, monkeypatch)
        baseline(extra)
        assert len(scored) == 2, f"{name}: the baseline was not computed again"
        baseline(extra)
        assert len(scored) == 2, f"{name}: the recomputed baseline was not reused"
        scored.clear()
        scored.append(1)


def test_the_cache_key_is_recorded_beside_the_number(world, capsys):
    out = world["root"] / "out"
    assert (
        main(["evaluate", "--catalog", str(world["catalog"]), "--eval_tasks", "[alpha]", "--output_dir", str(out)]) == 0
    )
    record = json.loads((out / "alpha" / "metrics" / "eval" / "test" / "single" / "full" / "metrics.json").read_text())
    key = record["key"]
    assert record["key_sha256"] == baseline_key.key_digest(key)
    assert set(key) == {
        "scoring_version",
        "lmerge_version",
        "task",
        "task_kind",
        "data",
        "split",
        "subset",
        "adapter",
        "base_model",
        "precision",
        "device",
    }
    assert key["data"] and all(len(digest) == 64 for digest in key["data"].values())
    assert {"tokenizer_config.json", "config.json"} <= set(key["base_model"]["files"])


def test_another_process_reuses_the_baseline(world, capsys):
    """The key holds nothing of one process (an object's address, a salted hash): a second
    process with the same inputs reads the cache instead of computing and rewriting it."""
    out = world["root"] / "out"
    argv = ["evaluate", "--catalog", str(world["catalog"]), "--eval_tasks", "[alpha]", "--output_dir", str(out)]
    assert main(argv) == 0
    cache = out / "alpha" / "metrics" / "eval" / "test" / "single" / "full" / "metrics.json"
    written = cache.stat().st_mtime_ns, cache.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345"}
    again = subprocess.run(
        [sys.executable, "-m", "lmerge", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert (cache.stat().st_mtime_ns, cache.read_bytes()) == written


def test_a_sweep_measures_its_points_again_when_an_input_changes(world, monkeypatch, capsys):
    """A sweep resumed (the same command again) or warm-started after any input of its scores
    changed (the adapters, the tasks' data and specs, the base model, the scoring code) measures
    its points again instead of reusing the old scores; unchanged, it evaluates nothing."""
    evaluated = []
    real = sweep_run.merge_to_bundle
    monkeypatch.setattr(sweep_run, "merge_to_bundle", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    out = world["root"] / "out"
    argv = ["sweep", "--adapters", "[alpha,beta]", "--method", "weighted_delta", "--search.grid.lambda", "[0.5]"]
    argv += ["--catalog", str(world["catalog"]), "--output_dir", str(out)]
    sweeps = out / "merged" / "weighted_delta" / "alpha_beta" / "sweeps"

    def sweep(extra: list[str]) -> int:
        evaluated.clear()
        assert main([*argv, *extra]) == 0
        return len(evaluated)

    assert (sweep([]), sweep([])) == (1, 0)
    for name, change in CHANGES.items():
        earlier = sorted(sweeps.glob("sweep_*[0-9].json"))[-1]
        extra = change(world, monkeypatch)
        assert sweep(extra) == 1, f"{name}: the sweep reused points measured before the change"
        warm = ["--search.warm_start_sweeps", f"[{earlier}]", "--search.grid.lambda", "[0.5, 1.0]"]
        capsys.readouterr()
        assert sweep([*extra, *warm]) == 2, f"{name}: a warm start reused a point measured before the change"
        assert f"warm start {earlier}: skipped: " in capsys.readouterr().err, name


def test_a_pooled_task_head_beside_the_adapter_is_in_the_key(zoo, tasks, tmp_path, capsys):
    """A plain LoRA of the bare encoder with its pooled head saved beside it (``task_head.*``):
    new head weights, or a head that says another pooling (which ``pooling: model`` follows), and
    the baseline is computed again."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from lmerge.tasks.heads import write_head

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModel.from_pretrained(zoo["bert"]),
        LoraConfig(task_type="FEATURE_EXTRACTION", r=2, lora_alpha=4, target_modules=["query", "value"]),
    )
    adapter = tmp_path / "pooled"
    model.save_pretrained(adapter)
    labels = yaml.safe_load(tasks.read_text())["tasks"]["alpha"]["label_names"]
    entry = yaml.safe_load(tasks.read_text())["tasks"]["alpha"]
    files = {split: str(tasks.parent / name) for split, name in entry["dataset"]["data_files"].items()}
    catalog = tmp_path / "catalog.yaml"
    task = {**entry, "adapter": str(adapter), "dataset": {"path": "json", "data_files": files}}
    catalog.write_text(yaml.safe_dump({"tasks": {"alpha": task}}))
    argv = ["evaluate", "--catalog", str(catalog), "--eval_tasks", "[alpha]", "--output_dir", str(tmp_path / "out")]
    cache = tmp_path / "out" / "alpha" / "metrics" / "eval" / "test" / "single" / "full" / "metrics.json"

    def baseline() -> dict:
        assert main(argv) == 0, capsys.readouterr().err
        return json.loads(cache.read_text())

    heads = [torch.randn(3, 32) * 3 for _ in range(2)]
    write_head(adapter, "mean", labels, heads[0], torch.zeros(3), root=adapter)
    first = baseline()
    assert first["task_kind"] == "classification (mean pooling)" and baseline() == first
    write_head(adapter, "mean", labels, heads[1], torch.zeros(3), root=adapter)
    second = baseline()
    assert second["key_sha256"] != first["key_sha256"] and second["value"] != first["value"]
    write_head(adapter, "last", labels, heads[1], torch.zeros(3), root=adapter)
    third = baseline()
    assert third["task_kind"] == "classification (last pooling)" and third["key_sha256"] != second["key_sha256"]
