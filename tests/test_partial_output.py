"""A run's bundle and its index entry appear together or not at all: a failing index append (a
damaged index, a full disk, a tag too long for a file name) leaves no bundle behind, a refused
first run leaves no output root, a run killed right after its append is taken over by its retry
instead of being recorded twice, and every verb checks its whole config before its first write."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_inputs import assert_refused, earlier_outputs, tree_digest
from test_faults import assert_consistent, merge_args

import lmerge.merge.writers as writers
from lmerge.__main__ import main
from lmerge.outputs.bundles import PENDING

COMBO = Path("merged") / "ties" / "alpha_beta"


def refused_in_one_line(code: int, err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lmerge: error: "), err
    assert expected in lines[0], lines[0]


def outputs_in(root: Path) -> dict[str, str]:
    """Every file under ``root`` less the single-task baseline caches (valid numbers a failed run
    may leave) and the index's lock file."""
    return {
        name: digest
        for name, digest in tree_digest(root).items()
        if digest != "dir" and "/single/" not in name and not name.endswith(".lock")
    }


def test_a_damaged_index_is_refused_before_any_work(tasks, tmp_path, capsys):
    out = tmp_path / "out"
    earlier_outputs(out)
    (out / COMBO / "eval" / "index.json").write_text('[{"merge_tag": "ties"}, {"merge_')
    before = tree_digest(out)
    code = main(merge_args(tasks, out))
    assert_refused(code, capsys.readouterr().err, "index.json: not a readable eval index", out, before)


def test_a_tag_too_long_for_the_file_names_is_refused_before_any_work(tasks, tmp_path, capsys):
    """The per-task file ``<task>_<tag>_metrics.json`` would pass the file system's limit."""
    out = tmp_path / "out"
    before = earlier_outputs(out)
    code = main([*merge_args(tasks, out), "--tag", "t" * 195])
    assert_refused(code, capsys.readouterr().err, "is longer than 200 bytes", out, before)


def lock_is_a_folder(out: Path) -> None:
    (out / COMBO / "eval" / "index.json.lock").mkdir()


def lock_links_inside(out: Path) -> None:
    (out / "elsewhere").mkdir()
    (out / COMBO / "eval" / "index.json.lock").symlink_to(out / "elsewhere")


def lock_dangles(out: Path) -> None:
    (out / COMBO / "eval" / "index.json.lock").symlink_to(out / "gone.lock")


def eval_is_a_file(out: Path) -> None:
    shutil.rmtree(out / COMBO / "eval")
    (out / COMBO / "eval").write_text("not a folder")


def runs_is_a_file(out: Path) -> None:
    shutil.rmtree(out / COMBO / "runs")
    (out / COMBO / "runs").write_text("not a folder")


@pytest.mark.parametrize(
    "spoil,expected",
    [
        (lock_is_a_folder, "index.json.lock: is not a file"),
        (lock_links_inside, "index.json.lock: is a link"),
        (lock_dangles, "index.json.lock: is a link"),
        (eval_is_a_file, "alpha_beta/eval: exists and is not a folder"),
        (runs_is_a_file, "alpha_beta/runs: exists and is not a folder"),
    ],
    ids=["lock is a folder", "lock links inside the root", "lock dangles", "eval is a file", "runs is a file"],
)
def test_an_index_or_bundles_folder_that_cannot_be_used_is_refused_before_any_work(
    tasks, tmp_path, capsys, spoil, expected
):
    """Found when the run is planned: no baseline computed, nothing at all written."""
    out = tmp_path / "out"
    earlier_outputs(out)
    spoil(out)
    before = tree_digest(out)
    assert_refused(main(merge_args(tasks, out)), capsys.readouterr().err, expected, out, before)


@pytest.mark.parametrize("code_", [errno.ENOSPC, errno.EDQUOT], ids=["disk full or out of inodes", "over quota"])
@pytest.mark.parametrize("point", ["index", "bundle", "staging"])
def test_a_full_disk_leaves_no_bundle_and_no_entry(tasks, tmp_path, capsys, monkeypatch, point, code_):
    """The write that fails is the index's, the adapter's or the staging folder's: one line, and
    the output root holds what it held (less the baseline caches, which are valid numbers)."""
    out = tmp_path / "out"
    earlier_outputs(out)
    before = outputs_in(out)
    full = OSError(code_, os.strerror(code_))
    real_replace = os.replace

    def replace(src, dst):
        if point == "index" and str(dst).endswith("index.json"):
            raise full
        return real_replace(src, dst)

    def save_file(*args, **kwargs):
        raise full

    def mkdtemp(*args, **kwargs):
        raise full

    monkeypatch.setattr(os, "replace", replace)
    if point == "bundle":
        monkeypatch.setattr(writers, "save_file", save_file)
    if point == "staging":
        monkeypatch.setattr("lmerge.outputs.bundles.tempfile.mkdtemp", mkdtemp)
    code = main(merge_args(tasks, out))
    refused_in_one_line(code, capsys.readouterr().err, os.strerror(code_))
    assert outputs_in(out) == before
    assert [p.name for p in (out / COMBO / "runs").iterdir()] == ["run_20240101_000000"]


def test_a_refused_first_run_leaves_no_output_root(zoo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "fresh" / "artifacts"

    def save_file(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writers, "save_file", save_file)
    code = main(
        ["merge", "--adapters", f"[{zoo['bert_a']},{zoo['bert_b']}]", "--method", "ties", "--output_dir", str(out)]
    )
    refused_in_one_line(code, capsys.readouterr().err, "No space left on device")
    assert not (tmp_path / "fresh").exists()


def test_a_failure_after_the_commit_is_completed_by_the_retry(tasks, tmp_path, capsys, monkeypatch):
    """A per-task link that cannot be written after the bundle and its entry are in place: the
    run is refused, the index and bundle stay consistent, and running the command again
    completes that run (its views) instead of recording a second one."""
    out = tmp_path / "out"
    real_symlink = os.symlink

    def symlink(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "symlink", symlink)
    refused_in_one_line(main(merge_args(tasks, out)), capsys.readouterr().err, "No space left on device")
    assert len(assert_consistent(out)) == 1
    monkeypatch.setattr(os, "symlink", real_symlink)
    assert main(merge_args(tasks, out)) == 0
    entries = assert_consistent(out)
    assert len(entries) == 1 and len(visible_runs(out)) == 1
    assert (out / "alpha" / "metrics" / "eval" / "test" / "merged" / "beta" / "ties" / "metrics.json").is_file()
    assert not list(out.rglob(PENDING))
    assert main(merge_args(tasks, out)) == 0  # a new run of the same command is a new entry
    assert len(assert_consistent(out)) == 2


def visible_runs(out: Path) -> list[Path]:
    return [p for p in (out / COMBO / "runs").iterdir() if not p.name.startswith(".")]


# Dies (SIGKILL: no handler, finally or atexit runs) right after the index append, before the
# bundle is renamed into place.
KILLED_AFTER_APPEND = """
import os, signal, sys
real_replace = os.replace

def replace_then_die(src, dst):
    real_replace(src, dst)
    if str(dst).endswith("index.json"):
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace_then_die
from lmerge.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_right_after_its_index_append_is_recorded_once(tasks, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_APPEND, *merge_args(tasks, out)], capture_output=True, env=env, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    entries = json.loads((out / COMBO / "eval" / "index.json").read_text())
    assert len(entries) == 1 and visible_runs(out) == []  # appended, not yet renamed

    assert main(merge_args(tasks, out)) == 0  # the retry
    entries = assert_consistent(out)
    assert len(entries) == 1 and [str(p) for p in visible_runs(out)] == [entries[0]["run_dir"]]
    assert not [p for p in (out / COMBO / "runs").iterdir() if p.name.startswith(".run.")]
    assert not list(out.rglob(PENDING))
    assert (out / COMBO / "eval" / "test" / "eval_results_ties_test.json").is_file()


SWEEP = ["sweep", "--adapters", "[alpha,beta]", "--method", "weighted_delta", "--search.grid.lambda", "[0.5]"]


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--transforms", "[{name: layer_l2_normalise}]"], "did you mean 'layer_l2_normalize'?"),
        (["--lambda_policy", "{type: per_layer, default: 0.5, overides: {0: 1}}"], "did you mean 'overrides'?"),
        (["--lambda_policy", "{type: per_layer, default: 0.5, overrides: {7: 1}}"], "layer 7 is not in the adapters"),
        (["--eval_tasks", "[alpha, gamma]"], "'gamma' is not a task in catalog"),
        (["--eval_subset", "{max_sample: 3}"], "eval_subset: unknown key 'max_sample'"),
        (["--eval_precision", "bf16_mixed"], "did you mean 'bf16-mixed'?"),
        (["--split", "dev"], "unknown split 'dev'"),
    ],
    ids=["transform", "policy key", "policy layer", "task", "subset", "precision", "split"],
)
def test_a_sweep_checks_its_whole_config_before_its_first_byte(tasks, tmp_path, capsys, flags, expected):
    """No journal, lock, baseline or folder: the output root stays as it was, and a fresh one is
    never made."""
    out = tmp_path / "out"
    before = earlier_outputs(out)
    code = main([*SWEEP, "--catalog", str(tasks), *flags, "--output_dir", str(out)])
    assert_refused(code, capsys.readouterr().err, expected, out, before)
    fresh = tmp_path / "fresh"
    assert main([*SWEEP, "--catalog", str(tasks), *flags, "--output_dir", str(fresh)]) == 2
    assert not fresh.exists()


def test_evaluate_checks_its_output_names_before_the_baselines(tasks, zoo, tmp_path, capsys):
    out = tmp_path / "out"
    before = earlier_outputs(out)
    argv = ["evaluate", "--catalog", str(tasks), "--eval_tasks", "[alpha]", "--adapter", str(zoo["bert_a"])]
    code = main([*argv, "--tag", "t" * 195, "--output_dir", str(out)])
    assert_refused(code, capsys.readouterr().err, "is longer than 200 bytes", out, before)


def test_fit_checks_its_export_before_training(tasks, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    before = earlier_outputs(out)
    monkeypatch.chdir(out)  # lightning_logs and checkpoints would show in the digest
    config = tmp_path / "fit.yaml"
    config.write_text(
        "model:\n  class_path: lmerge.learn.AdaMerging\n  init_args: {adapters: [alpha, beta]}\n"
        f"data: {{catalog: {tasks}, tasks: [alpha, beta], fit_split: test, batch_size: 4}}\n"
        "trainer: {max_steps: 1}\n"
    )
    code = main(["fit", "--config", str(config), "--export.eval_tasks", "[alpah]", "--export.output_dir", str(out)])
    assert_refused(code, capsys.readouterr().err, "'alpah' is not a task in catalog", out, before)


def test_a_merge_with_a_learner_checks_its_config_before_training(tasks, tmp_path, capsys, monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError("trained before the config was checked")

    monkeypatch.setattr("lmerge.learn.from_config.train_learner", train)
    out = tmp_path / "out"
    before = earlier_outputs(out)
    argv = ["merge", "--adapters", "[alpha,beta]", "--method", "weighted_delta_n", "--catalog", str(tasks)]
    argv += ["--optimizer", "adamerging", "--transforms", "[{name: sharpen}]", "--output_dir", str(out)]
    assert_refused(main(argv), capsys.readouterr().err, "unknown transform 'sharpen'", out, before)
