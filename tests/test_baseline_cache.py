"""The single-task baseline cache is keyed by everything its number depends on: change the task's
data, its spec, the eval subset, the adapter's config or head, the tokenizer, the base model or the
scoring code, and `lmerge evaluate` computes the baseline again; change nothing and it is reused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

import lmerge.evaluation.baseline_key as baseline_key
from lmerge.__main__ import main
from lmerge.evaluation.evaluate import Evaluator


@pytest.fixture
def world(zoo, tasks, tmp_path) -> dict[str, Path]:
    """A private copy of the BERT base model, task alpha's adapter, its data and a catalog over them."""
    entry = yaml.safe_load(tasks.read_text())["tasks"]["alpha"]
    base = Path(shutil.copytree(zoo["bert"], tmp_path / "bert"))
    adapter = Path(shutil.copytree(zoo["bert_a"], tmp_path / "alpha_adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    files = {}
    for split, name in entry["dataset"]["data_files"].items():
        files[split] = str(shutil.copy(tasks.parent / name, tmp_path / name))
    catalog = tmp_path / "catalog.yaml"
    task = {**entry, "adapter": str(adapter), "dataset": {"path": "json", "data_files": files}}
    catalog.write_text(yaml.safe_dump({"tasks": {"alpha": task}}))
    return {"base": base, "adapter": adapter, "catalog": catalog, "test": Path(files["test"]), "root": tmp_path}


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
    real = baseline_key._version
    monkeypatch.setattr(baseline_key, "_version", lambda package: "99.0" if package == "lmerge" else real(package))
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
