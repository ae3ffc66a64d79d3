"""The demo reuses a learner's merge only while everything it was learned from is unchanged: the
learner's config settings and flags, every task's spec, data and adapter, the base model, lmerge's
code and the packages' versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

import lmerge.demo.learned_cache as learned_cache
from lmerge.demo.learned_cache import LearnedCache, inputs_digest, learner_key
from lmerge.evaluation.baseline_key import source_digest
from lmerge.tasks.spec import catalog_tasks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def inputs(zoo, tasks, tmp_path) -> dict[str, Path]:
    """A learner config, a private base model, and a catalog of task alpha with a private copy of
    its adapter and data."""
    base = Path(shutil.copytree(zoo["bert"], tmp_path / "bert"))
    adapter = Path(shutil.copytree(zoo["bert_a"], tmp_path / "adapter"))
    entry = yaml.safe_load(tasks.read_text())["tasks"]["alpha"]
    files = {}
    for split, name in entry["dataset"]["data_files"].items():
        files[split] = str(shutil.copy(tasks.parent / name, tmp_path / name))
    task = {**entry, "adapter": str(adapter), "dataset": {"path": "json", "data_files": files}}
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": {"alpha": task}}))
    config = Path(shutil.copy(ROOT / "configs" / "supermerge.yaml", tmp_path / "supermerge.yaml"))
    return {"base": base, "adapter": adapter, "catalog": catalog, "config": config, "test": Path(files["test"])}


def key_of(inputs: dict[str, Path], fit_args: tuple[str, ...] = ()) -> str:
    specs = catalog_tasks(str(inputs["catalog"]), ["alpha"])
    return learner_key(inputs["config"], fit_args, inputs_digest(specs, inputs["base"]))


def test_the_key_changes_with_every_input_of_a_learner_and_nothing_else(inputs, monkeypatch):
    key = key_of(inputs)
    assert key_of(inputs) == key
    inputs["config"].write_text("# a comment changes no setting\n" + inputs["config"].read_text())
    assert key_of(inputs) == key

    changes = []
    config = yaml.safe_load(inputs["config"].read_text())
    inputs["config"].write_text(yaml.safe_dump({**config, "model": {**config["model"], "init_args": {"lr": 0.5}}}))
    changes.append(key_of(inputs))
    changes.append(key_of(inputs, ("--trainer.max_steps", "5")))
    weights = inputs["adapter"] / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 1e-3}, weights)
    changes.append(key_of(inputs))
    rows = json.loads(inputs["test"].read_text())
    inputs["test"].write_text(json.dumps(rows[:-1]))
    changes.append(key_of(inputs))
    config_file = inputs["base"] / "config.json"
    config_file.write_text(config_file.read_text() + "\n")
    changes.append(key_of(inputs))
    monkeypatch.setattr(learned_cache, "source_digest", lambda: "another version of the code")
    changes.append(key_of(inputs))
    monkeypatch.setattr(learned_cache, "package_version", lambda name: "0.0" if name == "torch" else "1.0")
    changes.append(key_of(inputs))
    assert len({key, *changes}) == len(changes) + 1


def test_the_source_digest_follows_the_code(tmp_path):
    package = tmp_path / "package"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("A = 1\n")
    (package / "sub" / "b.py").write_text("B = 2\n")
    digest = source_digest(package)
    (package / "notes.txt").write_text("not code")
    assert source_digest(package) == digest
    (package / "sub" / "b.py").write_text("B = 3\n")
    assert source_digest(package) != digest
    assert source_digest() == source_digest(Path(learned_cache.__file__).resolve().parents[1])


def test_a_record_is_reused_for_its_own_key_while_its_merge_spec_is_there(tmp_path):
    spec = tmp_path / "bundle" / "merge_spec.yaml"
    spec.parent.mkdir()
    spec.write_text("method: weighted_rank\n")
    outcome = {"merge_spec": str(spec), "coefficients": str(spec.parent / "coefficients.png"), "log_dir": None}
    record = tmp_path / "learned" / "supermerge.json"
    cache = LearnedCache(record, "key-1", tmp_path)
    assert cache.load() is None
    cache.save(outcome)
    assert cache.load() == outcome
    assert LearnedCache(record, "key-2", tmp_path).load() is None
    for damaged in ("{not json", "[1, 2]", '{"key": "key-1", "outcome": {"merge_spec": 3}}'):
        record.write_text(damaged)
        assert cache.load() is None
    cache.save(outcome)
    spec.unlink()
    assert cache.load() is None
