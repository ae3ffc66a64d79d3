"""Files from anywhere run no code: no unpickling (adapters never, checkpoints and base models only
through torch's weights-only loader), no model code unless the user sets LMERGE_TRUST_REMOTE_CODE,
and no name or planted symlink can make lmerge write outside its output root."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import lmerge
from lmerge.__main__ import main
from lmerge.errors import ConfigError
from lmerge.tasks.models import TRUST_REMOTE_CODE_ENV, load_model, trust_remote_code

SOURCES = [Path(lmerge.__file__).parent, Path(lmerge.__file__).parents[1] / "scripts"]


class Exploit:
    """Unpickling this makes a directory: proof that the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def calls(root: Path):
    """``(file, call node)`` for every call in the Python files under ``root``."""
    for file in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call):
                yield file, node


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def keyword(call: ast.Call, name: str):
    """The constant value of keyword ``name`` in ``call``; None when absent or not a constant."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_the_code_never_unpickles():
    """Every torch.load passes weights_only=True; no pickle.load(s) anywhere; adapters load
    nothing but safetensors."""
    offenders = []
    for root in SOURCES:
        for file, call in calls(root):
            name = dotted(call.func)
            if name in ("pickle.load", "pickle.loads", "torch.load") and keyword(call, "weights_only") is not True:
                offenders.append(f"{file}:{call.lineno} {name}")
            if "adapters" in file.parts and name.endswith(("torch.load", "load_state_dict")):
                offenders.append(f"{file}:{call.lineno} {name} in adapter loading")
    assert offenders == []


def test_remote_code_is_never_switched_on_in_code():
    """No call passes trust_remote_code=True; the only switch is the user's environment."""
    on = [
        f"{file}:{call.lineno}"
        for root in SOURCES
        for file, call in calls(root)
        if keyword(call, "trust_remote_code") not in (None, False, "<expr>")
    ]
    assert on == []


def test_malicious_pickle_adapter_is_refused_unrun(zoo, tmp_path, capsys):
    adapter = tmp_path / "pickled"
    shutil.copytree(zoo["bert_a"], adapter)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Exploit(tmp_path / "pwned")))
    assert main(["merge", "--adapters", f"[{adapter}]", "--method", "ties", "--output_dir", str(tmp_path / "o")]) == 2
    assert "pickle weights are refused" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_pickled_base_model_is_refused_unrun(zoo, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(zoo["bert"] / "config.json", base)
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(tmp_path / "pwned"), protocol=2))
    with pytest.raises(ConfigError, match="base model .*cannot be loaded"):
        load_model(str(base), "classification")
    assert not (tmp_path / "pwned").exists()


def test_pickled_checkpoint_is_refused_unrun(tasks, tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Exploit(tmp_path / "pwned")}, checkpoint)
    config = tmp_path / "fit.yaml"
    config.write_text(
        "model:\n  class_path: lmerge.learn.AdaMerging\n  init_args: {adapters: [alpha, beta]}\n"
        f"data: {{catalog: {tasks}, tasks: [alpha, beta], fit_split: test, batch_size: 4}}\n"
        f"trainer: {{max_steps: 1, logger: false, enable_checkpointing: false, default_root_dir: {tmp_path}}}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(config), "--ckpt_path", str(checkpoint)]) == 2
    assert "checkpoint refused, it holds pickled code" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "pwned").exists()


def test_model_code_runs_only_when_the_user_allows_it(zoo, tmp_path, monkeypatch):
    """A base model whose config asks for its own Python code (``auto_map``) is refused, and the
    code never runs; LMERGE_TRUST_REMOTE_CODE=1 is the one way to allow it."""
    base = tmp_path / "custom"
    base.mkdir()
    marker = tmp_path / "code_ran"
    (base / "custom_config.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import BertConfig\n\n\nclass CustomConfig(BertConfig):\n    model_type = 'custom-bert'\n"
    )
    config = json.loads((zoo["bert"] / "config.json").read_text())
    config.update(model_type="custom-bert", auto_map={"AutoConfig": "custom_config.CustomConfig"})
    (base / "config.json").write_text(json.dumps(config))
    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    with pytest.raises(ConfigError, match="custom code"):
        load_model(str(base), "classification")
    assert not marker.exists()
    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "1")
    assert trust_remote_code()
    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "0")
    assert not trust_remote_code()


# ---- nothing escapes the output root --------------------------------------------------------------
def test_task_names_from_a_catalog_cannot_escape(tasks, tmp_path, capsys):
    entries = yaml.safe_load(tasks.read_text())["tasks"]
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": {"../../escaped": entries["alpha"]}}))
    out = tmp_path / "sandbox" / "artifacts"
    code = main(["evaluate", "--catalog", str(catalog), "--eval_tasks", "[../../escaped]", "--output_dir", str(out)])
    assert code == 2 and "'../../escaped' is not a safe file name" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.glob("sandbox/**/*.json"))


def test_hidden_adapter_directory_names_are_refused(zoo, tmp_path, capsys):
    hidden = tmp_path / ".hidden"
    shutil.copytree(zoo["bert_a"], hidden)
    assert main(["merge", "--adapters", f"[{hidden}]", "--method", "ties", "--output_dir", str(tmp_path / "o")]) == 2
    assert "adapter name '.hidden' is not a safe file name" in capsys.readouterr().err


def test_run_metadata_cannot_steer_the_results_outside(zoo, tasks, tmp_path, capsys):
    """A downloaded 'run bundle' whose merge_metadata.json names a tag like ../../x."""
    bundle = tmp_path / "bundle"
    shutil.copytree(zoo["bert_a"], bundle)
    (bundle / "merge_metadata.json").write_text(
        json.dumps({"method": "ties", "tag": "../../../escaped", "adapters": [{"name": "alpha"}]})
    )
    out = tmp_path / "sandbox" / "artifacts"
    argv = ["evaluate", "--catalog", str(tasks), "--eval_tasks", "[alpha]", "--adapter", str(bundle)]
    assert main([*argv, "--output_dir", str(out)]) == 2
    assert "tag '../../../escaped' is not a safe file name" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*escaped*"))


@pytest.mark.parametrize("planted", ["merged", "merged/ties", "merged/ties/bert_a/runs"])
def test_a_planted_symlink_is_not_followed_for_writes(zoo, tmp_path, capsys, planted):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "artifacts"
    (out / planted).parent.mkdir(parents=True, exist_ok=True)
    (out / planted).symlink_to(outside)
    code = main(["merge", "--adapters", f"[{zoo['bert_a']}]", "--method", "ties", "--output_dir", str(out)])
    assert code == 2 and "outside the output root" in capsys.readouterr().err
    assert list(outside.iterdir()) == []


def test_a_planted_symlink_under_a_task_folder_is_not_followed(tasks, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "artifacts"
    out.mkdir()
    (out / "alpha").symlink_to(outside)
    code = main(["evaluate", "--catalog", str(tasks), "--eval_tasks", "[alpha]", "--output_dir", str(out)])
    assert code == 2 and "outside the output root" in capsys.readouterr().err
    assert list(outside.iterdir()) == []


def test_a_planted_symlink_at_the_sweeps_folder_is_not_followed(tasks, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "artifacts"
    (out / "merged" / "weighted_delta" / "alpha_beta").mkdir(parents=True)
    (out / "merged" / "weighted_delta" / "alpha_beta" / "sweeps").symlink_to(outside)
    argv = ["sweep", "--adapters", "[alpha,beta]", "--method", "weighted_delta", "--catalog", str(tasks)]
    code = main([*argv, "--search.grid.lambda", "[0.5]", "--output_dir", str(out)])
    assert code == 2 and "outside the output root" in capsys.readouterr().err
    assert list(outside.iterdir()) == []


def test_symlinks_that_stay_inside_the_root_are_fine(zoo, tmp_path, capsys):
    out = tmp_path / "artifacts"
    (out / "elsewhere").mkdir(parents=True)
    (out / "merged").symlink_to("elsewhere")
    assert main(["merge", "--adapters", f"[{zoo['bert_a']}]", "--method", "ties", "--output_dir", str(out)]) == 0
    assert list((out / "elsewhere").glob("ties/bert_a/runs/run_*/adapter_model.safetensors"))
