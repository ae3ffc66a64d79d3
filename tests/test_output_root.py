"""Nothing lmerge writes, renames or deletes lies outside its output root, and an input directory
is never written: names read from a sweep's shared storage or from a run's metadata cannot steer a
path, `lmerge evaluate --adapter DIR` leaves DIR as it was, and every write goes through the one
path check of lmerge.outputs."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from test_bad_inputs import assert_refused, earlier_outputs, tree_digest

import lmerge
from lmerge.__main__ import main
from lmerge.sweep.study import WORKER_ATTR

LMERGE = Path(lmerge.__file__).parent

SWEEP = ["sweep", "--adapters", "[alpha,beta]", "--method", "weighted_delta", "--search.grid.lambda", "[0.5]"]


def journal_study(summary: Path) -> optuna.Study:
    record = json.loads(summary.read_text())
    backend = optuna.storages.journal.JournalFileBackend(record["storage"])
    return optuna.load_study(study_name=record["study"], storage=optuna.storages.JournalStorage(backend))


def test_a_worker_id_from_the_shared_storage_cannot_delete_files_outside(tasks, tmp_path, capsys):
    """A running trial whose worker id (read back from the journal) climbs out of the sweep's
    workers folder: the sweep refuses it in one line and the lock file it names stays."""
    out = tmp_path / "out"
    argv = [*SWEEP, "--catalog", str(tasks), "--output_dir", str(out)]
    assert main(argv) == 0
    summary = next((out / "merged" / "weighted_delta" / "alpha_beta" / "sweeps").glob("sweep_*.json"))
    victim = tmp_path / "victim.lock"
    victim.write_text("not lmerge's")
    workers = summary.parent / "workers"
    hostile = os.path.relpath(tmp_path / "victim", workers)
    assert hostile.startswith("../")
    trial = journal_study(summary).ask()
    trial.set_user_attr(WORKER_ATTR, hostile)  # left running: a later worker checks its owner
    capsys.readouterr()
    code = main(argv)
    assert_one_line(code, capsys.readouterr().err, f"a trial names the worker {hostile!r}")
    assert victim.read_text() == "not lmerge's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "victim.lock"]


def assert_one_line(code: int, err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lmerge: error: "), err
    assert expected in lines[0], lines[0]


def test_a_journal_storage_that_is_a_directory_is_one_line(tasks, tmp_path, capsys):
    out = tmp_path / "out"
    before = earlier_outputs(out)
    code = main([*SWEEP, "--catalog", str(tasks), "--output_dir", str(out), "--storage", str(tmp_path)])
    assert_refused(code, capsys.readouterr().err, f"storage {tmp_path}: is a directory", out, before)


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_evaluate_never_writes_into_the_adapter_it_reads(tasks, tmp_path, capsys, where):
    """A run bundle evaluated with --adapter is an input: its folder stays byte for byte as it was,
    whether it lies outside the output root or inside it; the results go under the root."""
    made = tmp_path / "made"
    argv = ["merge", "--adapters", "[alpha,beta]", "--method", "ties", "--catalog", str(tasks)]
    assert main([*argv, "--output_dir", str(made)]) == 0
    bundle = next((made / "merged" / "ties" / "alpha_beta" / "runs").iterdir())
    out = made if where == "inside" else tmp_path / "out"
    before = tree_digest(bundle)
    evaluate = ["evaluate", "--catalog", str(tasks), "--eval_tasks", "[alpha,beta]", "--split", "validation"]
    assert main([*evaluate, "--adapter", str(bundle), "--output_dir", str(out)]) == 0
    assert tree_digest(bundle) == before
    results = out / "merged" / "ties" / "alpha_beta" / "eval" / "validation" / "eval_results_ties_validation.json"
    assert json.loads(results.read_text())["split"] == "validation"
    index = json.loads((out / "merged" / "ties" / "alpha_beta" / "eval" / "index.json").read_text())
    assert index[-1]["run_dir"] == str(bundle) and index[-1]["results_file"] == str(results)
    assert f"results: {results}" in capsys.readouterr().out


def test_a_symlinked_index_lock_leading_outside_is_refused_before_any_work(tasks, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    before = earlier_outputs(out)
    lock = out / "merged" / "ties" / "alpha_beta" / "eval" / "index.json.lock"
    lock.symlink_to(outside / "planted.lock")
    before = tree_digest(out)
    argv = ["merge", "--adapters", "[alpha,beta]", "--method", "ties", "--catalog", str(tasks)]
    code = main([*argv, "--eval_tasks", "[alpha]", "--output_dir", str(out)])
    assert_refused(code, capsys.readouterr().err, "index.json.lock: resolves to", out, before)
    assert list(outside.iterdir()) == []


# Calls that write, rename or delete (on any object, or, for names that other objects use too, on
# os and shutil), and the only places outside lmerge.outputs allowed to make them: each writes into
# a staging folder that lmerge.outputs made (and checked) for it.
WRITING_CALLS = {
    "write_text",
    "write_bytes",
    "mkdir",
    "makedirs",
    "rmtree",
    "unlink",
    "rename",
    "symlink",
    "symlink_to",
    "hardlink_to",
    "save_file",
    "save_pretrained",
    "FileLock",
    "touch",
    "copyfile",
    "copytree",
}
OS_WRITING_CALLS = {"replace", "remove", "rmdir", "move", "copy", "copy2", "link"}
STAGED_WRITERS = {
    ("merge/writers.py", "write_text"),
    ("merge/writers.py", "save_file"),
    ("merge/writers.py", "save_pretrained"),
    ("merge/writers.py", "mkdir"),
    ("learn/finetune.py", "save_pretrained"),
}


def called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def writes(call: ast.Call) -> bool:
    """Whether ``call`` writes, renames or deletes a file: a writing name, ``os.replace`` and
    friends, ``open(path, "w"/"a"/"x"...)`` or ``os.open`` with a creating flag."""
    name = called_name(call)
    receiver = ast.unparse(call.func.value) if isinstance(call.func, ast.Attribute) else ""
    if name in WRITING_CALLS or (name in OS_WRITING_CALLS and receiver in ("os", "shutil")):
        return True
    if name == "open" and len(call.args) > 1 and isinstance(call.args[1], ast.Constant):
        return any(c in str(call.args[1].value) for c in "wax+")
    return name == "open" and receiver == "os" and "O_CREAT" in ast.unparse(call)


def test_every_write_goes_through_the_one_path_check():
    """Outside lmerge/outputs/, no code writes, renames or deletes a file itself (save for the
    writers that fill a staging folder): every path passes lmerge.outputs.inside_root."""
    offenders = []
    for file in sorted(LMERGE.rglob("*.py")):
        relative = file.relative_to(LMERGE).as_posix()
        if relative.startswith("outputs/"):
            continue
        tree = ast.parse(file.read_text())
        checked = {  # lmerge.outputs' own functions: they check their paths
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmerge.outputs")
            for alias in node.names
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or (isinstance(node.func, ast.Name) and node.func.id in checked):
                continue
            name = called_name(node)
            if writes(node) and (relative, name) not in STAGED_WRITERS:
                offenders.append(f"{relative}:{node.lineno} {ast.unparse(node.func)}")
    assert offenders == []


def test_a_bundle_copied_in_from_elsewhere_is_read_not_written(tasks, zoo, tmp_path, capsys):
    """A PEFT adapter directory (no lmerge metadata) evaluated with --adapter inside the root:
    recorded under merged/adapter/<name>, its own folder untouched."""
    out = tmp_path / "out"
    adapter = shutil.copytree(zoo["bert_a"], out / "incoming" / "bert_a")
    before = tree_digest(adapter)
    argv = ["evaluate", "--catalog", str(tasks), "--eval_tasks", "[alpha]", "--adapter", str(adapter)]
    assert main([*argv, "--output_dir", str(out)]) == 0
    assert tree_digest(adapter) == before
    assert (out / "merged" / "adapter" / "bert_a" / "eval" / "index.json").is_file()


def catalog_over(tasks: Path, adapter: Path, path: Path) -> Path:
    """The test catalog with task alpha's adapter replaced by ``adapter``."""
    data = yaml.safe_load(tasks.read_text())
    for entry in data["tasks"].values():
        files = entry["dataset"]["data_files"]
        entry["dataset"]["data_files"] = {split: str(tasks.parent / name) for split, name in files.items()}
    data["tasks"]["alpha"]["adapter"] = str(adapter)
    path.write_text(yaml.safe_dump(data))
    return path


# How each verb reads the adapter (a copy of task alpha's) whose folder would hold the output root.
INPUT_VERBS = {
    "merge": ["merge", "--adapters", "[{adapter},{bert_b}]", "--method", "ties"],
    "merge by task name": ["merge", "--adapters", "[alpha,beta]", "--method", "ties", "--catalog", "{catalog}"],
    "merge evaluating a task": ["merge", "--adapters", "[{bert_b},{bert_c}]", "--method", "ties"]
    + ["--catalog", "{catalog}", "--eval_tasks", "[alpha]"],
    "merge with a learner": ["merge", "--adapters", "[alpha,beta]", "--method", "weighted_delta_n"]
    + ["--optimizer", "adamerging", "--catalog", "{catalog}"],
    "sweep": ["sweep", "--adapters", "[alpha,beta]", "--method", "weighted_delta", "--catalog", "{catalog}"]
    + ["--search.grid.lambda", "[0.5]"],
    "evaluate a bundle": ["evaluate", "--catalog", "{catalog}", "--eval_tasks", "[beta]", "--adapter", "{adapter}"],
    "evaluate the baselines": ["evaluate", "--catalog", "{catalog}", "--eval_tasks", "[alpha]"],
    "fit": ["fit", "--config", "{fit}", "--export.output_dir"],
}
FIT = (
    "model:\n  class_path: lmerge.learn.AdaMerging\n  init_args: {{adapters: [alpha, beta]}}\n"
    "data: {{catalog: {catalog}, tasks: [alpha, beta], fit_split: test, batch_size: 4}}\n"
    "trainer: {{max_steps: 1, logger: false, enable_checkpointing: false}}\n"
)


@pytest.mark.parametrize("linked", [False, True], ids=["inside", "linked inside"])
@pytest.mark.parametrize("verb", sorted(INPUT_VERBS))
def test_an_output_root_inside_an_input_adapter_is_refused(zoo, tasks, tmp_path, capsys, monkeypatch, verb, linked):
    """An output root that is, or resolves through a symlink to, a folder inside an adapter the
    verb reads (named by path or by task, merged or evaluated): one line before any work, the
    adapter byte for byte as it was."""

    def train(*args, **kwargs):
        raise AssertionError("trained before the output root was checked")

    monkeypatch.setattr("lmerge.learn.from_config.train_learner", train)
    adapter = Path(shutil.copytree(zoo["bert_a"], tmp_path / "adapter"))
    (adapter / "artifacts").mkdir()
    before = tree_digest(adapter)
    catalog = catalog_over(tasks, adapter, tmp_path / "catalog.yaml")
    out = adapter / "artifacts"
    if linked:
        out = tmp_path / "out"
        out.symlink_to(adapter / "artifacts")
    fit = tmp_path / "fit.yaml"
    fit.write_text(FIT.format(catalog=catalog))
    monkeypatch.chdir(tmp_path)
    names = {"adapter": adapter, "catalog": catalog, "fit": fit, "bert_b": zoo["bert_b"], "bert_c": zoo["bert_c"]}
    argv = [arg.format(**names) for arg in INPUT_VERBS[verb]]
    flag = [] if argv[-1].endswith("output_dir") else ["--output_dir"]
    code = main([*argv, *flag, str(out)])
    assert_one_line(code, capsys.readouterr().err, f"lies inside the adapter {adapter}; an input is never written")
    assert tree_digest(adapter) == before
