"""Atomic writes, staged run bundles, the locked eval index, and safe names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmerge.errors import OutputError
from lmerge.outputs import append_index, link_atomic, run_bundle, safe_component, write_json_atomic

APPENDER = """
import sys
from pathlib import Path
from lmerge.outputs import append_index
path, worker = Path(sys.argv[1]), int(sys.argv[2])
for i in range(25):
    append_index(path, {"worker": worker, "i": i}, root=path.parent)
"""


def test_index_survives_eight_concurrent_writers(tmp_path):
    index = tmp_path / "eval" / "index.json"
    workers = [subprocess.Popen([sys.executable, "-c", APPENDER, str(index), str(w)]) for w in range(8)]
    assert [w.wait(timeout=300) for w in workers] == [0] * 8
    entries = json.loads(index.read_text())
    assert len(entries) == 200  # none lost
    assert sorted((e["worker"], e["i"]) for e in entries) == [(w, i) for w in range(8) for i in range(25)]


def test_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    write_json_atomic(target, {"version": 1}, root=tmp_path)

    def crash(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(OutputError, match="results.json: cannot be written"):
        write_json_atomic(target, {"version": 2}, root=tmp_path)
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left


def test_index_append_keeps_history_when_a_write_fails(tmp_path, monkeypatch):
    index = tmp_path / "index.json"
    append_index(index, {"n": 1}, root=tmp_path)
    monkeypatch.setattr("os.fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OutputError):
        append_index(index, {"n": 2}, root=tmp_path)
    assert json.loads(index.read_text()) == [{"n": 1}]


def test_failed_run_leaves_no_bundle(tmp_path):
    with pytest.raises(RuntimeError), run_bundle(tmp_path, "ties", ["a", "b"]) as bundle:
        (bundle.work / "adapter_model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # not even the folders made for it


def test_runs_in_the_same_second_get_distinct_bundles(tmp_path):
    finals = []
    for _ in range(3):
        with run_bundle(tmp_path, "ties", ["a"]) as bundle:
            (bundle.work / "summary.json").write_text("{}")
        finals.append(bundle.final)
    assert len(set(finals)) == 3 and all((f / "summary.json").is_file() for f in finals)


@pytest.mark.parametrize("name", ["../up", "/abs", "a/b", ".hidden", "", "x\\y", "a..b"])
def test_unsafe_names_cannot_escape_the_output_root(name):
    with pytest.raises(OutputError, match="not a safe file name"):
        safe_component(name, "task")


def test_a_link_is_replaced_not_followed_and_its_folder_stays_inside(tmp_path):
    """A link that lmerge made to something outside the root (the demo's link to an installed
    model) is pointed elsewhere on the next run; a link whose folder leads outside is refused."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "model").mkdir(parents=True)
    link = root / "demo" / "base_model"
    link_atomic(link, outside / "model", root=root)
    link_atomic(link, outside / "other", root=root)
    assert os.readlink(link) == os.path.relpath(outside / "other", link.parent)
    assert sorted(p.name for p in outside.iterdir()) == ["model"]
    (root / "escape").symlink_to(outside)
    with pytest.raises(OutputError, match="outside the output root"):
        link_atomic(root / "escape" / "base_model", outside / "model", root=root)
    assert sorted(p.name for p in outside.iterdir()) == ["model"]


def test_many_adapters_with_long_names_merge_into_a_folder_a_file_system_accepts(zoo, tmp_path):
    """32 adapters whose names join into 800+ bytes (a file name's limit is 255): the merge's
    folder is named by its first names, how many more and a digest of all, so another set of
    the same first names gets another folder."""
    import shutil

    from lmerge.__main__ import main

    names = [f"adapter_for_the_task_number_{i:02d}" for i in range(32)]
    for i, name in enumerate(names):
        shutil.copytree(zoo["bert_a" if i % 2 else "bert_b"], tmp_path / name)
    out = tmp_path / "out"

    def merge(chosen: list[str]) -> str:
        listed = ",".join(str(tmp_path / name) for name in chosen)
        assert main(["merge", "--adapters", f"[{listed}]", "--method", "task_vector", "--output_dir", str(out)]) == 0
        (folder,) = [p.name for p in (out / "merged" / "task_vector").iterdir() if p.name not in seen]
        seen.add(folder)
        assert (out / "merged" / "task_vector" / folder / "runs").is_dir()
        return folder

    seen: set[str] = set()
    every, all_but_last = merge(names), merge(names[:-1])
    assert every.startswith("adapter_for_the_task_number_00_") and "_and_" in every
    assert len(every.encode()) <= 200 and len(all_but_last.encode()) <= 200
    assert every != all_but_last
