"""Faults: a process killed (SIGKILL) while it saves a merge or appends to the evaluation index
leaves every earlier output intact, no half-written run bundle, and an index that the next run
extends without losing an entry."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmerge.__main__ import main
from lmerge.adapters.lora import LoraAdapter
from lmerge.errors import OutputError
from lmerge.outputs import append_index, run_bundle
from lmerge.outputs.bundles import _HOST

# Runs ``lmerge`` with one write replaced by "write part of it, then SIGKILL ourselves": the
# process dies at that exact point, with no handler, ``finally`` or atexit running.
KILLED_WRITER = """
import os, signal, sys
import lmerge.merge.writers as save
point = sys.argv[1]
real_save, real_replace = save.save_file, os.replace

def save_half_then_die(tensors, filename, metadata=None):
    real_save(tensors, filename, metadata=metadata)
    data = open(filename, "rb").read()
    open(filename, "wb").write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

def die_before_replacing_index(src, dst):
    if str(dst).endswith("index.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

if point == "save":
    save.save_file = save_half_then_die
else:
    os.replace = die_before_replacing_index
from lmerge.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def merge_args(tasks: Path, out: Path) -> list[str]:
    return [
        "merge",
        "--adapters",
        "[alpha,beta]",
        "--catalog",
        str(tasks),
        "--method",
        "ties",
        "--eval_tasks",
        "[alpha,beta]",
        "--output_dir",
        str(out),
    ]


def visible_tree(root: Path) -> dict[str, bytes | str]:
    """Every non-hidden file and folder under ``root`` with its content (hidden staging and temp
    names are what a killed writer may leave; nothing reads them)."""
    tree: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root)
        if any(part.startswith(".") for part in name.parts):
            continue
        tree[str(name)] = "dir" if path.is_dir() and not path.is_symlink() else path.read_bytes()
    return tree


def assert_consistent(root: Path) -> list[dict]:
    """Every run bundle complete and loadable, every index entry pointing at existing files,
    every per-task link resolving. Returns the index entries."""
    combo = root / "merged" / "ties" / "alpha_beta"
    for run in (combo / "runs").iterdir():
        if run.name.startswith("."):
            continue
        json.loads((run / "summary.json").read_text())
        json.loads((run / "merge_metadata.json").read_text())
        adapter = LoraAdapter(run)
        for key in adapter.module_keys:
            adapter.factors(key)
    entries = json.loads((combo / "eval" / "index.json").read_text())
    for entry in entries:
        assert Path(entry["results_file"]).is_file() and Path(entry["run_dir"]).is_dir()
    for link in root.glob("*/metrics/eval/*/merged/*/*/metrics.json"):
        json.loads(link.read_text())
    return entries


def run_killed(point: str, tasks: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, point, *merge_args(tasks, out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


@pytest.mark.parametrize("point", ["save", "index"])
def test_sigkill_while_writing_leaves_earlier_outputs_and_the_index_intact(tasks, tmp_path, capsys, point):
    out = tmp_path / "artifacts"
    assert main(merge_args(tasks, out)) == 0
    before = visible_tree(out)
    runs_before = {p.name for p in (out / "merged" / "ties" / "alpha_beta" / "runs").iterdir()}

    killed = run_killed(point, tasks, out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    runs = out / "merged" / "ties" / "alpha_beta" / "runs"
    if point == "save":
        # Killed inside the staging folder, half the adapter written: nothing visible changed.
        staged = [p for p in runs.iterdir() if p.name.startswith(".run.")]
        assert len(staged) == 1 and (staged[0] / "adapter_model.safetensors").is_file()
        assert visible_tree(out) == before
        assert {p.name for p in runs.iterdir() if not p.name.startswith(".")} == runs_before
    earlier = assert_consistent(out)
    assert len(earlier) == 1  # the earlier entry, whole

    # The lock died with the process: the same command runs and the index grows by one, and the
    # staging folder the killed process left behind is gone.
    assert main(merge_args(tasks, out)) == 0
    entries = assert_consistent(out)
    assert len(entries) == 2 and entries[0] == earlier[0]
    assert not [p for p in runs.iterdir() if p.name.startswith(".run.")]


@pytest.mark.slow
def test_sigkill_at_random_moments_never_breaks_the_outputs(tasks, tmp_path):
    """Merges with evaluation, killed at random moments within the time a whole run takes, then
    one more run: every bundle complete, every finished run's index entry there."""
    out = tmp_path / "artifacts"
    command = [sys.executable, "-m", "lmerge", *merge_args(tasks, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The fastest of two whole runs: the first, with cold caches, can take longer than every later
    # one, and kills timed by it would all come after the end.
    durations = []
    for _ in range(2):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        durations.append(time.perf_counter() - started)
    whole = min(durations)
    rng = random.Random(0)
    finished, killed = 2, 0
    for _ in range(6):
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(0.3, 0.9) * whole)
        child.send_signal(signal.SIGKILL)
        code = child.wait()
        finished += code == 0
        killed += code == -signal.SIGKILL
        assert len(assert_consistent(out)) >= finished  # a run killed after its append may add one
    assert killed >= 1
    assert main(merge_args(tasks, out)) == 0
    assert len(assert_consistent(out)) >= finished + 1


def test_a_damaged_index_is_never_overwritten(tmp_path):
    """An index that no longer parses (edited by hand, a disk error) is refused, not replaced."""
    index = tmp_path / "index.json"
    index.write_bytes(b'[{"merge_tag": "ties"}, {"merge_')
    with pytest.raises(OutputError, match="index.json: not a readable eval index"):
        append_index(index, {"merge_tag": "dare"}, root=tmp_path)
    assert index.read_bytes() == b'[{"merge_tag": "ties"}, {"merge_'


def test_only_staging_folders_of_dead_processes_are_removed(tmp_path):
    runs = tmp_path / "merged" / "ties" / "a" / "runs"
    runs.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _HOST
    left = {
        "dead": runs / f".run.{host}.{dead.pid}.abc.staging",
        "alive": runs / f".run.{host}.{os.getpid()}.abc.staging",
        "other host": runs / f".run.elsewhere-{host}.{dead.pid}.abc.staging",
    }
    for folder in left.values():
        folder.mkdir()
    with run_bundle(tmp_path, "ties", ["a"]) as bundle:
        (bundle.work / "summary.json").write_text("{}")
    assert [name for name, folder in left.items() if folder.exists()] == ["alive", "other host"]
