"""A console a user can read: lmerge's verbs print their own lines, progress bars and one-line
errors, the libraries' notes only with ``--verbose``; an unknown name gets the closest valid one."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmerge.__main__ import main

# What Lightning, transformers and other libraries print on their own, and lmerge keeps quiet.
LIBRARY_LINES = (
    "💡 Tip",
    "GPU available",
    "TPU available",
    "HPU available",
    "modules in eval mode",
    "Trainable params",
    "LOAD REPORT",
    "FutureWarning",
    "UserWarning",
    "Seed set",
    "`Trainer.fit` stopped",
)


def run_lmerge(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # the test suite's own quieting, not lmerge's
    return subprocess.run(
        [sys.executable, "-m", "lmerge", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )


def fit_config(tasks: Path, tmp_path: Path) -> Path:
    config = tmp_path / "fit.yaml"
    config.write_text(
        "model:\n  class_path: lmerge.learn.AdaMerging\n  init_args: {adapters: [alpha, beta], lr: 0.05}\n"
        f"data: {{catalog: {tasks}, tasks: [alpha, beta], fit_split: test, batch_size: 4}}\n"
        "trainer: {max_steps: 2}\n"
        f"export: {{output_dir: {tmp_path / 'out'}}}\n"
    )
    return config


def test_fit_prints_lmerge_lines_and_not_the_libraries(tasks, tmp_path):
    """The run's own line (where the learned merge went) and nothing of Lightning's
    conversation; ``--verbose`` brings it back."""
    quiet = run_lmerge(["fit", "--config", str(fit_config(tasks, tmp_path))], tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    console = quiet.stdout + quiet.stderr
    assert [line for line in LIBRARY_LINES if line in console] == []
    assert "learned merge: " in quiet.stdout

    verbose = run_lmerge(["fit", "--config", str(fit_config(tasks, tmp_path)), "--verbose"], tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    assert "GPU available" in verbose.stdout + verbose.stderr and "Trainable params" in verbose.stdout


def pooled_catalog(zoo, tasks: Path, tmp_path: Path) -> Path:
    """Tasks plain_a and plain_b: plain LoRAs of the bare BERT encoder with a pooled head beside
    them, on task alpha's data. Loading the bare encoder from a checkpoint with a classifier is
    what makes transformers print its weight-load report."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from lmerge.tasks.heads import write_head

    alpha = yaml.safe_load(tasks.read_text())["tasks"]["alpha"]
    files = {split: str(tasks.parent / name) for split, name in alpha["dataset"]["data_files"].items()}
    entries = {}
    for name, seed in (("plain_a", 1), ("plain_b", 2)):
        torch.manual_seed(seed)
        config = LoraConfig(task_type="FEATURE_EXTRACTION", r=2, lora_alpha=4, target_modules=["query", "value"])
        get_peft_model(AutoModel.from_pretrained(zoo["bert"]), config).save_pretrained(tmp_path / name)
        write_head(tmp_path / name, "mean", alpha["label_names"], torch.randn(3, 32), torch.zeros(3), root=tmp_path)
        entries[name] = {**alpha, "adapter": str(tmp_path / name), "dataset": {"path": "json", "data_files": files}}
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": entries}))
    return catalog


@pytest.mark.slow
def test_sweep_prints_lmerge_lines_and_not_the_libraries(zoo, tasks, tmp_path):
    """A sweep's table, best point and summary path, and nothing of transformers' weight-load
    report; ``--verbose`` brings it back."""
    catalog = pooled_catalog(zoo, tasks, tmp_path)
    argv = ["sweep", "--adapters", "[plain_a,plain_b]", "--method", "ties", "--search.grid.lambda", "[0.5,1.0]"]
    argv += ["--catalog", str(catalog)]
    quiet = run_lmerge([*argv, "--output_dir", str(tmp_path / "quiet")], tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert [line for line in LIBRARY_LINES if line in quiet.stdout + quiet.stderr] == []
    assert quiet.stdout.startswith("rank  lambda") and "\nsweep: " in quiet.stdout
    assert [line for line in quiet.stderr.splitlines() if not line.startswith("lmerge: ")] == []

    verbose = run_lmerge([*argv, "--output_dir", str(tmp_path / "verbose"), "--verbose"], tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    assert "LOAD REPORT" in verbose.stderr


def test_an_error_is_the_only_line(tasks, tmp_path):
    """A refusal after the libraries have loaded (Lightning imported, the model built) is still
    the one line on the console."""
    config = fit_config(tasks, tmp_path)
    refused = run_lmerge(["fit", "--config", str(config), "--trainer.max_steps", "two"], tmp_path)
    assert refused.returncode == 2
    assert refused.stdout == "" and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith("lmerge: error: ")


def gamma(**fields) -> dict:
    """A catalog with one task, gamma, holding ``fields``."""
    entry = {"adapter": "gamma_adapter", "dataset": {"path": "json", "data_files": "x.json"}, **fields}
    return {"tasks": {"gamma": entry}}


MISSPELT = [
    ("merge --adapters [alpha] --method tie", None, "unknown method 'tie'; did you mean 'ties'?"),
    ("merge --method ties --transforms [identy]", None, "unknown transform 'identy'; did you mean 'identity'?"),
    (
        "merge --method ties --lambda_policy per_layr",
        None,
        "unknown lambda policy 'per_layr'; did you mean 'per_layer'?",
    ),
    ("merge --method ties --eval_tasks [alpah]", None, "'alpah' is not a task in catalog"),
    ("merge --adapters [alpah] --method ties", None, "did you mean 'alpha'?"),
    ("merge --method ties --method_params '{kk: 3}'", None, "method_params.kk: not a parameter of method 'ties'; did"),
    ("merge --adapters [alpha] --methd ties", None, "did you mean '--method'?"),
    ("merge --config {file}", {"adapters": ["alpha"], "methd": "ties"}, "methd: unknown key for lmerge merge; did"),
    ("evaluate --catalog {file} --eval_tasks [gamma]", gamma(kind="clasification"), "did you mean 'classification'?"),
    ("evaluate --catalog {file} --eval_tasks [gamma]", gamma(metric="acuracy"), "did you mean 'accuracy'?"),
    ("evaluate --catalog {file} --eval_tasks [gamma]", gamma(lable_names=["a"]), "did you mean 'label_names'?"),
]


@pytest.mark.parametrize("command,file,expected", MISSPELT, ids=[c[2].split(";")[0][:40] for c in MISSPELT])
def test_a_misspelt_name_gets_the_closest_valid_one(tasks, tmp_path, capsys, command, file, expected):
    """Every merge names the catalog, so task names resolve; ``{file}`` is ``file`` as YAML."""
    path = tmp_path / "file.yaml"
    path.write_text(yaml.safe_dump(file))
    argv = shlex.split(command.replace("{file}", str(path)))
    if argv[0] == "merge" and "--config" not in argv:
        argv += ["--adapters", "[alpha,beta]"] if "--adapters" not in argv else []
        argv += ["--catalog", str(tasks)]
    code = main([*argv, "--output_dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lmerge: error: "), lines
    assert expected in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["adapters", "eval_tasks"])
def test_a_name_yaml_reads_as_a_boolean_says_to_quote_it(tasks, tmp_path, capsys, key):
    """The test catalog has a task named yes: unquoted in a list flag, YAML makes it true."""
    argv = ["merge", "--method", "ties", "--catalog", str(tasks), "--output_dir", str(tmp_path / "out")]
    argv += ["--adapters", '["yes",maybe]'] if key == "eval_tasks" else []
    code = main([*argv, f"--{key}", "[yes,maybe]"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lmerge: error: "), lines
    assert key in lines[0] and "Got value: True" in lines[0]
    assert "YAML reads an unquoted yes, no, on, off, true or false as a boolean: quote it" in lines[0]
    assert not (tmp_path / "out").exists()
    quoted = [*argv, f"--{key}", '["yes",maybe]']
    assert main(quoted if key == "adapters" else [*quoted, "--eval_subset", "{max_samples: 2}"]) == 0
