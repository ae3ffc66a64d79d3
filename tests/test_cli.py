"""The ``lmerge`` command: help, shipped configs, legacy keys, and a merge end to end."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmerge.__main__ import main
from lmerge.merge.config import MergeConfig
from lmerge.methods import METHODS, register
from lmerge.methods.registry import Kind
from lmerge.sweep.config import SweepConfig
from lmerge.tasks.catalog import load_catalog

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "callbacks").rglob("*.yaml"))


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_verb_method_and_save_option(capsys):
    assert main(["--help"]) == 0
    overview = capsys.readouterr().out
    for verb in ("merge", "sweep", "evaluate", "fit", "validate", "test"):
        assert f"  {verb} " in overview
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in METHODS:
        assert f"{name} (" in text
    for flag in ("--save.format", "--save.rank", "--save.base_model", "--lambda_policy", "--transforms"):
        assert flag in text


def test_merge_help_lists_a_method_registered_after_import(capsys):
    @register("late_probe", kind=Kind.LINEAR, defaults={"scale": 2.0})
    def late_probe(n, params, ctx):
        """A method registered after the command was imported."""
        return [params["scale"]] * n

    try:
        with pytest.raises(SystemExit):
            main(["merge", "--help"])
    finally:
        del METHODS["late_probe"]
    text = " ".join(capsys.readouterr().out.split())
    assert "late_probe (linear): A method registered after the command was imported. parameters: scale=2.0" in text


@pytest.mark.parametrize(
    ("verb", "schema", "left_out"), [("merge", MergeConfig, set()), ("sweep", SweepConfig, {"tag"})]
)
def test_merge_and_sweep_keys_are_their_config_fields(verb, schema, left_out, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--adapters", "[a]", "--method", "ties", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(printed) == {f.name for f in dataclasses.fields(schema)} - left_out


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_parse_with_the_command_they_name(path, capsys, monkeypatch):
    """Each shipped file begins with the command that runs it; that command parses (the real CLI
    parser, ``--print_config`` stops before anything runs)."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# lmerge "), f"{path} must begin with the command that runs it"
    command = shlex.split(first.removeprefix("# ").split("  ")[0])
    assert str(path.relative_to(ROOT)) in command
    if path.name == "catalog.yaml":
        assert load_catalog(path, require_adapter=False, require_data=False)  # a task catalog, read by --catalog
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main([*command[1:], "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {
        "merge_weighted_scalar.yaml",
        "merge_weighted_per_layer.yaml",
        "merge_dare.yaml",
        "merge_ties.yaml",
    } <= names


def test_merge_from_config_with_flag_overrides(zoo, tmp_path, capsys):
    config = tmp_path / "m.yaml"
    config.write_text(f"adapters: [{zoo['llama_a']}, {zoo['llama_b']}]\nmethod: ties\nmethod_params: {{k: 20}}\n")
    code, out, err = run(
        [
            "merge",
            "--config",
            config,
            "--method_params.k",
            "50",
            "--save.rank",
            "4",
            "--output_dir",
            tmp_path / "out",
        ],
        capsys,
    )
    assert code == 0, err
    run_dir = Path(out.split("run bundle: ")[1].strip())
    meta = json.loads((run_dir / "merge_metadata.json").read_text())
    assert meta["params"] == {"k": 50.0, "lambda": 1.0, "space": "weight"}
    assert meta["save"]["rank"] == 4
    assert run_dir.parent.parent == tmp_path / "out" / "merged" / "ties" / "llama_a_llama_b"
    assert {a["name"] for a in meta["adapters"]} == {"llama_a", "llama_b"}
    assert all(len(a["sha256"]) == 64 for a in meta["adapters"])
    assert set(meta["versions"]) >= {"torch", "transformers", "peft", "safetensors", "lmerge"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tag"] == "ties_k=50.0"


def test_legacy_keys_and_flag_still_work(zoo, tmp_path, capsys):
    config = tmp_path / "legacy.yaml"
    config.write_text(f"adapters: [{zoo['bert_a']}, {zoo['bert_b']}]\nmethod: weighted_delta\nlambda: 0.3\n")
    code, out, err = run(["merge", "--config", config, "--output_dir", tmp_path, "--save.format", "none"], capsys)
    assert code == 0, err
    assert "DeprecationWarning" in err and "'lambda' is deprecated; use method_params.lambda" in err
    assert "weighted_delta_lambda=0.3" in out
    params = tmp_path / "params.yaml"
    params.write_text(f"adapters: [{zoo['bert_a']}, {zoo['bert_b']}]\nmethod: task_vector\nparams: {{lambda: 0.2}}\n")
    code, out, err = run(["merge", "--config", params, "--lambda", "0.6", "--output_dir", tmp_path], capsys)
    assert code == 0, err
    assert "task_vector_lambda=0.6" in out and "--lambda is deprecated" in err
    both = tmp_path / "both.yaml"
    both.write_text(f"adapters: [{zoo['bert_a']}]\nmethod: task_vector\nlambda: 0.7\nmethod_params: {{lambda: 2.0}}\n")
    code, out, err = run(["merge", "--config", both, "--output_dir", tmp_path / "both"], capsys)
    assert code == 2 and not (tmp_path / "both").exists()
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith("both.yaml: lambda: 0.7 conflicts with method_params.lambda: 2.0; keep method_params.lambda only")
    )


def test_common_mode_reports_what_it_left_out(zoo, tmp_path, capsys):
    code, out, err = run(
        [
            "merge",
            "--adapters",
            f"[{zoo['llama_a']},{zoo['llama_c']}]",
            "--method",
            "uniform_delta",
            "--output_dir",
            tmp_path,
        ],
        capsys,
    )
    assert code == 0, err
    assert "left out 10 module(s) of 'llama_a' that not every adapter has" in err
    assert "over 4 modules" in out


def test_per_layer_policy_and_transform(zoo, tmp_path, capsys):
    code, out, err = run(
        [
            "merge",
            "--adapters",
            f"[{zoo['bert_a']},{zoo['bert_b']}]",
            "--method",
            "task_vector",
            "--lambda_policy",
            "{type: per_layer, default: 0.5, overrides: {1: 0.0}}",
            "--transforms",
            "[{name: layer_l2_normalize, params: {target_norm: 2.0}}]",
            "--output_dir",
            tmp_path,
        ],
        capsys,
    )
    assert code == 0, err
    from lmerge.adapters import LoraAdapter

    saved = LoraAdapter(Path(out.split("run bundle: ")[1].strip()))
    layer0 = [k for k in saved.module_keys if ".layer.0." in k]
    layer1 = [k for k in saved.module_keys if ".layer.1." in k]
    for key in layer1:
        A, B = saved.factors(key)
        assert float((B @ A).abs().max()) == 0.0
    # Each adapter's layer 0 was normalized to norm 2, then weighted 0.5 each.
    norms = []
    for key in layer0:
        A, B = saved.factors(key)
        norms.append(B @ A)
    assert all(n.norm() > 0 for n in norms)


def test_tags_name_the_lambda_used_and_tell_policies_and_transforms_apart(zoo, tmp_path, capsys):
    """The tag names the merge: a scalar policy's value is its lambda; per-layer policies and
    transforms that differ give different tags (their evaluations would share files otherwise)."""
    adapters = f"[{zoo['bert_a']},{zoo['bert_b']}]"
    tags = []
    for extra in (
        ["--lambda_policy", "{value: 1.3}"],
        ["--lambda_policy", "{type: per_layer, default: 0.1}"],
        ["--lambda_policy", "{type: per_layer, default: 3.0}"],
        ["--transforms", "[{name: layer_l2_normalize, params: {target_norm: 2.0}}]"],
        [],
    ):
        argv = ["merge", "--adapters", adapters, "--method", "iso_c", *extra, "--save.format", "none"]
        code, out, err = run([*argv, "--output_dir", tmp_path], capsys)
        assert code == 0, err
        tags.append(out.split("merged 2 adapters with ")[1].split()[0])
    assert tags[0] == "iso_c_lambda=1.3" and tags[-1] == "iso_c"
    assert tags[1].startswith("iso_c_lambda_policy=") and tags[3].startswith("iso_c_transforms=")
    assert len(set(tags)) == 5


def test_real_command_exit_code_and_debug(tmp_path):
    command = [
        sys.executable,
        "-m",
        "lmerge",
        "merge",
        "--adapters",
        f"[{tmp_path / 'missing'}]",
        "--method",
        "ties",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "missing" in done.stderr
    assert "Traceback" not in done.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert "Traceback" in debug.stderr
    assert not (tmp_path / "artifacts").exists()


def test_the_demo_flags_its_messages_name_parse():
    """The demo's console says ``--retrain true`` / ``--refit true`` / ``--rescore true`` (jsonargparse
    booleans take a value)."""
    from lmerge.__main__ import build_parser

    sources = "".join((ROOT / "lmerge" / "demo" / name).read_text() for name in ("runs.py", "pipeline.py"))
    assert "--refit true to learn it again" in sources and "--retrain true to train it again" in sources
    assert "--rescore true to score them again" in sources
    parser, _ = build_parser()
    settings = parser.parse_args(["demo", "--refit", "true", "--retrain", "true", "--rescore", "true", "--jobs", "3"])
    assert settings.demo.refit is True and settings.demo.retrain is True and settings.demo.jobs == 3
    assert settings.demo.rescore is True


def test_demo_jobs_must_not_be_negative(capsys):
    from lmerge.__main__ import main

    assert main(["demo", "--jobs", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "lmerge: error: jobs: must be 0 (one per core) or more, got -1"
    assert main(["demo", "--learner_precision", "bf16"]) == 2
    assert capsys.readouterr().err.strip().startswith("lmerge: error: learner_precision: unknown precision 'bf16'")
    assert main(["demo", "--ranking_precision", "fp16"]) == 2
    assert capsys.readouterr().err.strip().startswith("lmerge: error: ranking_precision: unknown precision 'fp16'")
