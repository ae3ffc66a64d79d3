"""Crashes that became refusals: a corrupt checkpoint, warm-start points that cannot be ranked,
hostile or deeply nested YAML and JSON handed to any verb (``fit`` included), and a disk that
fills up under a library's write. Each is one line, exit code 2, and nothing written."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import optuna
import pytest
import torch
from test_bad_inputs import assert_refused, earlier_outputs

from lmerge.__main__ import main
from lmerge.yaml_files import MAX_DEPTH

FIT = (
    "model:\n  class_path: lmerge.learn.AdaMerging\n  init_args: {{adapters: [alpha, beta]}}\n"
    "data: {{catalog: {catalog}, tasks: [alpha, beta], fit_split: test, batch_size: 4}}\n"
    "trainer: {{max_steps: 1, logger: false, enable_checkpointing: false}}\n"
)


def refuse(argv: list, out: Path, expected: str, capsys, before: dict[str, str], *more: str) -> None:
    """``lmerge argv`` refused in one line holding ``expected`` (and ``more``), ``out`` untouched."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert_refused(code, err, expected, out, before)
    assert all(part in err for part in more), err


# ---- a checkpoint to resume from that is not one ------------------------------------------------------
def truncated_checkpoint(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(64)}, "epoch": 0}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damaged_checkpoint(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(4096)}, "epoch": 0}, path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # inside the tensor's bytes: the member's checksum fails
    path.write_bytes(bytes(data))


def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


@pytest.mark.parametrize(
    "make,expected",
    [
        (random_bytes, "not a readable PyTorch checkpoint"),
        (truncated_checkpoint, "not a readable PyTorch checkpoint"),
        (damaged_checkpoint, "damaged checkpoint"),
    ],
    ids=["random bytes", "truncated", "damaged member"],
)
def test_a_corrupt_checkpoint_is_refused_before_training(tasks, tmp_path, capsys, monkeypatch, make, expected):
    out = tmp_path / "out"
    before = earlier_outputs(out)
    monkeypatch.chdir(out)
    config = tmp_path / "fit.yaml"
    config.write_text(FIT.format(catalog=tasks))
    checkpoint = tmp_path / "resume.ckpt"
    make(checkpoint)
    refuse(
        ["fit", "--config", config, "--ckpt_path", checkpoint],
        out,
        f"ckpt_path {checkpoint}: {expected}",
        capsys,
        before,
    )


# ---- warm-start points that cannot be ranked --------------------------------------------------------
SWEEP = ["sweep", "--adapters", "[alpha,beta]", "--method", "weighted_delta", "--search.grid.lambda", "[0.5,1.0]"]


@pytest.fixture(scope="module")
def earlier_sweep(tasks, tmp_path_factory) -> dict:
    """The summary of a real sweep over the same space, to be spoilt point by point."""
    out = tmp_path_factory.mktemp("earlier")
    assert main([*SWEEP, "--catalog", str(tasks), "--output_dir", str(out)]) == 0
    return json.loads(next(out.rglob("sweep_*[0-9].json")).read_text())


def no_score(point: dict) -> None:
    del point["score"]


@pytest.mark.parametrize(
    "spoil,expected",
    [
        (no_score, "points[0].score: expected a finite number, got None"),
        (lambda point: point.update(score=float("nan")), "points[0].score: expected a finite number, got nan"),
        (lambda point: point.update(average_delta="x"), "points[0].average_delta: expected a finite number"),
        (lambda point: point.pop("params"), "points[0]: expected a point with its params"),
        (lambda point: point.clear(), "points[0]: expected a point with its params"),
    ],
    ids=["no score", "NaN score", "average delta not a number", "no params", "empty point"],
)
def test_warm_start_points_that_cannot_be_ranked_are_refused(tasks, tmp_path, capsys, earlier_sweep, spoil, expected):
    out = tmp_path / "out"
    before = earlier_outputs(out)
    summary = json.loads(json.dumps(earlier_sweep))
    spoil(summary["points"][0])
    earlier = tmp_path / "sweep_earlier.json"
    earlier.write_text(json.dumps(summary))  # NaN is written as JSON's NaN token
    argv = [*SWEEP, "--catalog", tasks, "--search.warm_start_sweeps", f"[{earlier}]", "--output_dir", out]
    refuse(argv, out, f"search.warm_start_sweeps: {earlier}: {expected}", capsys, before)


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"points": [], "points": []}', "duplicate key 'points'"),
        ('{"points": ' + "[" * 5000 + "]" * 5000 + "}", f"nested deeper than {MAX_DEPTH} levels"),
    ],
    ids=["duplicate key", "deep nesting"],
)
def test_a_hostile_sweep_summary_is_refused(tasks, tmp_path, capsys, text, expected):
    out = tmp_path / "out"
    before = earlier_outputs(out)
    earlier = tmp_path / "sweep_hostile.json"
    earlier.write_text(text)
    argv = [*SWEEP, "--catalog", tasks, "--search.warm_start_sweeps", f"[{earlier}]", "--output_dir", out]
    refuse(argv, out, f"{earlier}: {expected}", capsys, before)


# ---- hostile YAML and JSON, to every verb (fit's configs: test_yaml_files) --------------------------
@pytest.mark.parametrize(
    "verb,flags",
    [
        ("merge", ["--method_params", "{k: " + "[" * 200 + "]" * 200 + "}"]),
        ("merge", ["--method_params", "{k: 20, k: 30}"]),
        ("sweep", ["--eval_subset", "{max_samples: 1, max_samples: 2}"]),
        ("evaluate", ["--eval_subset", "{a: &a [*a]}"]),
    ],
    ids=["deep flag value", "duplicate key in a flag", "duplicate key in a sweep flag", "self-referring alias"],
)
def test_flag_values_are_read_strictly(tasks, tmp_path, capsys, verb, flags):
    out = tmp_path / "out"
    before = earlier_outputs(out)
    common = {
        "merge": ["--adapters", "[alpha,beta]", "--method", "ties", "--catalog", tasks],
        "sweep": ["--adapters", "[alpha,beta]", "--method", "weighted_delta", "--catalog", tasks],
        "evaluate": ["--eval_tasks", "[alpha]", "--catalog", tasks],
    }[verb]
    refuse([verb, *common, *flags, "--output_dir", out], out, "config value", capsys, before)


def test_a_deep_merge_metadata_is_refused(zoo, tasks, tmp_path, capsys):
    out = tmp_path / "out"
    before = earlier_outputs(out)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bundle / name).write_bytes((zoo["bert_a"] / name).read_bytes())
    (bundle / "merge_metadata.json").write_text('{"method": "ties", "x": ' + "[" * 3000 + "]" * 3000 + "}")
    argv = ["evaluate", "--catalog", tasks, "--eval_tasks", "[alpha]", "--adapter", bundle, "--output_dir", out]
    refuse(argv, out, "merge_metadata.json: nested deeper than", capsys, before)


# ---- a full disk under a library's own write --------------------------------------------------------
def test_a_full_disk_under_the_sweep_journal_is_one_line(tasks, tmp_path, capsys, monkeypatch):
    def full(self, logs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "study.journal")

    monkeypatch.setattr(optuna.storages.journal.JournalFileBackend, "append_logs", full)
    code = main([*SWEEP, "--catalog", str(tasks), "--output_dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == ["lmerge: error: study.journal: cannot be written (No space left on device)"]


def test_a_full_disk_under_the_baseline_cache_is_one_line(tasks, tmp_path, capsys, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("metrics.json"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    code = main(["evaluate", "--catalog", str(tasks), "--eval_tasks", "[alpha]", "--output_dir", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and os.strerror(errno.EDQUOT) in lines[0]
    assert not [p for p in out.rglob("*") if p.is_file()]
