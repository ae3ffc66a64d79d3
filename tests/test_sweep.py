"""Sweeps: grid and bayes over merge parameters, warm start, resume after SIGKILL, shared studies,
bad inputs, and the best point's config reproducing its score."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from lmerge.__main__ import main
from lmerge.errors import LMergeError
from lmerge.merge.config import MergeConfig, load_merge_config
from lmerge.pipeline import run_merge
from lmerge.sweep import SweepConfig, load_sweep_config, run_sweep
from lmerge.sweep import run as sweep_run

ROOT = Path(__file__).resolve().parents[1]


def sweep_config(tasks, out, **overrides) -> SweepConfig:
    values = {
        "adapters": ["alpha", "beta"],
        "catalog": str(tasks),
        "method": "weighted_delta",
        "output_dir": str(out),
        "search": {"type": "grid", "grid": {"lambda": [0.0, 0.5, 1.0]}},
    }
    values.update(overrides)
    return SweepConfig(**values)


@pytest.fixture
def count_evaluations(monkeypatch) -> list[dict]:
    """Every point the sweep merges and evaluates, by its method parameters."""
    calls = []
    real = sweep_run.merge_to_bundle

    def counted(config, evaluator=None):
        calls.append(dict(config.method_params))
        return real(config, evaluator=evaluator)

    monkeypatch.setattr(sweep_run, "merge_to_bundle", counted)
    return calls


def test_grid_covers_exactly_the_product_loading_the_model_once(tasks, tmp_path, monkeypatch):
    import lmerge.evaluation.evaluate as evaluate

    loads = []
    real = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", lambda *args: loads.append(args) or real(*args))
    search = {"type": "grid", "grid": {"k": [20, 60], "lambda": [0.5, 1.0]}}
    result = run_sweep(sweep_config(tasks, tmp_path, method="ties", search=search))
    combos = sorted((p["params"]["k"], p["params"]["lambda"]) for p in result.points)
    assert combos == [(20.0, 0.5), (20.0, 1.0), (60.0, 0.5), (60.0, 1.0)]
    assert result.evaluated == 4 and len(loads) == 1
    assert result.path.parent == tmp_path / "merged" / "ties" / "alpha_beta" / "sweeps"
    summary = json.loads(result.path.read_text())
    assert len(summary["points"]) == 4 and summary["best"] == result.best
    assert summary["search"]["grid"] == search["grid"]
    for point in result.points:
        deltas = [t["interference_delta"] for t in point["tasks"].values()]
        assert point["score"] == min(deltas)
        assert point["average_delta"] == pytest.approx(sum(deltas) / len(deltas))
    ranked = max(result.points, key=lambda p: (p["score"], p["average_delta"]))
    assert (result.best["score"], result.best["average_delta"]) == (ranked["score"], ranked["average_delta"])
    assert result.plot.read_bytes()[:4] == b"\x89PNG"
    index = json.loads((tmp_path / "merged" / "ties" / "alpha_beta" / "eval" / "index.json").read_text())
    assert len(index) == 4


def test_rerun_resumes_without_evaluating_again(tasks, tmp_path, count_evaluations):
    settings = {"eval_subset": {"enabled": True, "max_samples": 8}, "save_merged": True}
    first = run_sweep(sweep_config(tasks, tmp_path, **settings))
    second = run_sweep(sweep_config(tasks, tmp_path, **settings))
    assert (first.evaluated, second.evaluated, len(count_evaluations)) == (3, 0, 3)
    assert second.points == first.points and second.path != first.path
    assert all((Path(p["run_dir"]) / "adapter_model.safetensors").is_file() for p in first.points)
    index = json.loads((tmp_path / "merged" / "weighted_delta" / "alpha_beta" / "eval" / "index.json").read_text())
    assert len(index) == 3 and {entry["subset"] for entry in index} == {
        json.loads(first.path.read_text())["identity"]["subset"]
    }
    assert all(task["examples"] == 8 for entry in index for task in entry["tasks"].values())


def test_bayes_respects_budget_bounds_and_seed(tasks, tmp_path):
    search = {"type": "bayes", "budget": 5, "init_points": 2, "seed": 7, "space": {"lambda": {"min": -0.5, "max": 1.5}}}
    runs = [
        run_sweep(sweep_config(tasks, tmp_path / name, search=search, constraint_nonnegative=True))
        for name in ("one", "two")
    ]
    proposed = [[p["params"]["lambda"] for p in run.points] for run in runs]
    assert len(proposed[0]) == 5 and proposed[0] == proposed[1]
    assert all(0.0 <= value <= 1.5 for value in proposed[0])
    assert len(set(proposed[0])) == 5


def test_warm_start_evaluates_only_new_points(tasks, tmp_path, count_evaluations, capsys):
    earlier = run_sweep(sweep_config(tasks, tmp_path, search={"type": "grid", "grid": {"lambda": [0.0, 0.5]}}))
    grid = {"lambda": [0.0, 0.5, 1.0]}
    warm = {"type": "grid", "grid": grid, "warm_start_sweeps": [str(earlier.path.parent)]}
    result = run_sweep(sweep_config(tasks, tmp_path, search=warm))
    assert count_evaluations == [{"lambda": 0.0}, {"lambda": 0.5}, {"lambda": 1.0}]
    assert result.evaluated == 1
    assert sorted(p["params"]["lambda"] for p in result.points) == [0.0, 0.5, 1.0]
    assert sum(1 for p in result.points if p.get("warm_start")) == 2
    # At most one warm point (the best), over a bayes space this time: nothing else is evaluated twice.
    capped = {"type": "bayes", "budget": 1, "space": {"lambda": {"min": 0, "max": 1}}}
    capped.update(warm_start_sweeps=[str(earlier.path)], warm_start_max_points=1)
    result = run_sweep(sweep_config(tasks, tmp_path, search=capped))
    assert [bool(p.get("warm_start")) for p in result.points] == [True, False]
    assert result.points[0]["score"] == earlier.best["score"]
    assert "1 earlier point(s) match" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("method", "task_vector", "method differs"),
        ("adapters", ["alpha", "gamma"], "adapters differs"),
        ("merge_mode", "strict", "merge_mode differs"),
        ("split", "validation", "split differs"),
        ("eval_tasks", ["alpha"], "eval_tasks differs"),
        ("constraint_nonnegative", True, "constraint_nonnegative differs"),
    ],
)
def test_warm_start_skips_sweeps_measured_otherwise(tmp_path, key, value, reason, capsys):
    from lmerge.methods import get_method
    from lmerge.sweep.search import SearchConfig
    from lmerge.sweep.space import build_space
    from lmerge.sweep.warm_start import warm_points

    identity = {
        "method": "weighted_delta",
        "adapters": ["alpha", "beta"],
        "merge_mode": "common",
        "split": "test",
        "eval_tasks": ["alpha", "beta"],
        "subset": "full",
        "constraint_nonnegative": False,
    }
    point = {"params": {"lambda": 0.5}, "score": 0.1, "average_delta": 0.2, "tasks": {}}
    outside = {"params": {"lambda": 0.7}, "score": 0.3, "average_delta": 0.2, "tasks": {}}
    good = tmp_path / "sweep_good.json"
    good.write_text(json.dumps({"identity": identity, "points": [point, outside]}))
    other = tmp_path / "sweep_other.json"
    other.write_text(json.dumps({"identity": {**identity, key: value}, "points": [point]}))
    search = SearchConfig(type="grid", grid={"lambda": [0.5, 1.0]}, warm_start_sweeps=[str(tmp_path / "sweep_*.json")])
    space = build_space(search, get_method("weighted_delta"), False)
    chosen = warm_points(search, identity, space, {"lambda": 0.5})
    assert [(params, score) for params, score, _ in chosen] == [({"lambda": 0.5}, 0.1)]
    err = capsys.readouterr().err
    assert f"warm start {other}: skipped: {reason}" in err
    assert f"warm start {good}: 1 point(s) skipped: outside this sweep's space" in err


def test_best_point_config_reproduces_its_score(tasks, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    data = {
        "adapters": ["alpha", "beta"],
        "catalog": str(tasks),
        "method": "uniform_scalar_delta",
        "output_dir": str(tmp_path / "out"),
        "grid": {"scale": [0.5, 1.0]},  # the legacy top-level key
    }
    config.write_text(yaml.safe_dump(data))
    code = main(
        ["sweep", "--config", str(config), "--search.grid.scale", "[-0.5,0.25,1.0]", "--constraint_nonnegative", "true"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "constraint_nonnegative leaves out -0.5" in err
    summary = json.loads(Path(out.rsplit("\nsweep: ", 1)[1].strip()).read_text())
    assert sorted(p["params"]["scale"] for p in summary["points"]) == [0.25, 1.0]
    assert "rank" in out and "score" in out and "# lmerge merge --config" in out
    best = summary["best"]
    first_line = Path(summary["best_config"]).read_text().splitlines()[0]
    assert first_line == f"# lmerge merge --config {summary['best_config']}"
    result = run_merge(load_merge_config(summary["best_config"]))
    assert result.evaluation.aggregate["min_delta"] == best["score"]
    assert result.params == best["params"]


def test_merge_optimizer_bayes_searches_then_merges_the_best(tasks, tmp_path):
    config = MergeConfig(
        adapters=["alpha", "beta"],
        catalog=str(tasks),
        method="weighted_delta",
        optimizer={"name": "bayes", "params": {"budget": 3}},
        search={"init_points": 2, "space": {"lambda": {"type": "float", "min": 0.0, "max": 1.0}}},
        eval_tasks=["alpha", "beta"],
        output_dir=str(tmp_path),
    )
    result = run_merge(config)
    record = result.metadata["optimizer"]
    assert record["name"] == "bayes" and len(record["points"]) == 3 and record["search"]["budget"] == 3
    assert result.params == record["best"]["params"]
    assert result.evaluation.aggregate["min_delta"] == record["best"]["score"]
    assert Path(record["sweep"]).is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"search": {"type": "random"}}, "search.type: 'random' is not one of grid, bayes"),
        ({"search": {"type": "grid", "grid": {}}}, "search.grid: empty"),
        ({"search": {"type": "grid", "grid": {"lambda": []}}}, "search.grid.lambda: expected a non-empty list"),
        (
            {"search": {"type": "grid", "grid": {"alpha": [1]}}},
            "search.grid.alpha: not a parameter of method 'weighted_delta'",
        ),
        (
            {"search": {"type": "bayes", "space": {"lambda": {"min": 1, "max": 0}}}},
            "search.space.lambda: min 1.0 is greater than max 0.0",
        ),
        (
            {"search": {"type": "bayes", "space": {"lambda": {"type": "beta"}}}},
            "search.space.lambda.type: 'beta' is not one of",
        ),
        ({"search": {"type": "bayes", "budget": 0}}, "search.budget: must be at least 1"),
        (
            {"search": {"type": "grid", "grid": {"lambda": [1]}, "warm_start_sweeps": ["nowhere/sweep_*.json"]}},
            "search.warm_start_sweeps: nowhere/sweep_*.json matches no sweep file",
        ),
        ({"search": {"grid": {"lambda": [1]}, "budgets": 3}}, "search.budgets: unknown key"),
        ({"optimizer": "adamerging"}, "optimizer: 'adamerging' cannot run inside a sweep"),
        (
            {"search": {"type": "grid", "grid": {"lambda": [-1.0]}}, "constraint_nonnegative": True},
            "search.grid.lambda: no value is >= 0",
        ),
    ],
)
def test_bad_sweep_inputs_name_the_key(tasks, tmp_path, overrides, message):
    with pytest.raises(LMergeError) as info:
        run_sweep(sweep_config(tasks, tmp_path, **overrides))
    assert message in str(info.value)


def test_bad_sweep_input_on_the_command_line_is_one_line(tasks, tmp_path, capsys):
    code = main(
        ["sweep", "--adapters", "[alpha,beta]", "--catalog", str(tasks), "--method", "weighted_delta"]
        + ["--search.type", "bayes", "--search.space.lambda", "{min: 2, max: 1}", "--output_dir", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "lmerge: error: search.space.lambda: min 2.0 is greater than max 1.0"
    ]


def test_load_sweep_config_reads_the_shipped_example():
    config = load_sweep_config(ROOT / "configs" / "merge" / "merge_weighted_delta_sweep_bayes.yaml")
    assert config.search.type == "bayes" and config.search.space["lambda"]["max"] == 1.0
    assert config.eval_tasks == ["sentiment", "question"]


# ---- several processes ----------------------------------------------------------------------------------
def write_grid_config(tasks, path: Path, out: Path, points: int) -> Path:
    data = {
        "adapters": ["alpha", "beta"],
        "catalog": str(tasks),
        "method": "uniform_scalar_delta",
        "output_dir": str(out),
        "eval_batch_size": 1,  # slow points, so a worker is caught mid-evaluation
        "search": {"type": "grid", "grid": {"scale": [round(0.1 * i, 1) for i in range(points)]}},
    }
    path.write_text(yaml.safe_dump(data))
    return path


# Runs `lmerge sweep` with its first point held until every worker of the test has reached its own,
# so that no worker can finish the whole grid before the others have started.
_SWEEP_AT_A_BARRIER = """
import os, sys, time
from pathlib import Path
from lmerge.__main__ import main
from lmerge.sweep import run

barrier, workers, config = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
merge, reached = run.merge_to_bundle, []

def merge_after_the_barrier(*args, **kwargs):
    if not reached:
        reached.append(True)
        (barrier / f"ready_{os.getpid()}").touch()
        deadline = time.monotonic() + 120
        while len(list(barrier.glob("ready_*"))) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
    return merge(*args, **kwargs)

run.merge_to_bundle = merge_after_the_barrier
sys.exit(main(["sweep", "--config", config]))
"""


def start_sweep(config: Path, barrier: Path | None = None, workers: int = 1) -> subprocess.Popen:
    """`lmerge sweep --config config` in its own process; with ``barrier``, its first point waits for
    ``workers`` processes to reach theirs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "lmerge", "sweep", "--config", str(config)]
    if barrier is not None:
        command = [sys.executable, "-c", _SWEEP_AT_A_BARRIER, str(barrier), str(workers), str(config)]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def index_entries(out: Path) -> list[dict]:
    path = out / "merged" / "uniform_scalar_delta" / "alpha_beta" / "eval" / "index.json"
    return json.loads(path.read_text()) if path.exists() else []


def study_trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    sweeps = out / "merged" / "uniform_scalar_delta" / "alpha_beta" / "sweeps"
    journals = list(sweeps.glob("study_*.journal"))
    if not journals:
        return []
    (journal,) = journals
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    try:
        return optuna.load_study(study_name=journal.stem, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # the journal is there, the study not yet written into it
        return []


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_set(tasks, tmp_path):
    out = tmp_path / "out"
    config = write_grid_config(tasks, tmp_path / "grid.yaml", out, points=8)
    process = start_sweep(config)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        # Stopped, the worker cannot move on while we look: kill it only in the middle of a point.
        process.send_signal(signal.SIGSTOP)
        states = [t.state for t in study_trials(out)]
        if states.count(optuna.trial.TrialState.COMPLETE) >= 2 and optuna.trial.TrialState.RUNNING in states:
            process.send_signal(signal.SIGKILL)
            break
        process.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    process.wait()
    done = len([t for t in study_trials(out) if t.state == optuna.trial.TrialState.COMPLETE])
    assert 2 <= done < 8, "the sweep must be killed mid-way"
    assert any(t.state == optuna.trial.TrialState.RUNNING for t in study_trials(out)), "killed mid-evaluation"
    result = run_sweep(load_sweep_config(config))
    scales = sorted(p["params"]["scale"] for p in result.points)
    assert scales == [round(0.1 * i, 1) for i in range(8)]
    assert result.evaluated == 8 - done
    states = [t.state for t in study_trials(out)]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and states.count(optuna.trial.TrialState.COMPLETE) == 8


@pytest.mark.slow
def test_two_processes_share_one_study_with_disjoint_points(tasks, tmp_path):
    out = tmp_path / "out"
    config = write_grid_config(tasks, tmp_path / "grid.yaml", out, points=8)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes = [start_sweep(config, barrier, workers=2) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    tags = [entry["merge_tag"] for entry in index_entries(out)]
    assert len(tags) == 8 and len(set(tags)) == 8  # every point evaluated once, by one of the two
    workers = {t.user_attrs["lmerge_worker"] for t in study_trials(out)}
    assert len(workers) == 2
    summaries = [json.loads(Path(stdout.rsplit("\nsweep: ", 1)[1].strip()).read_text()) for stdout, _ in outputs]
    assert summaries[0]["points"] == summaries[1]["points"]


def test_bayes_reuses_a_point_the_sampler_proposes_again(tasks, tmp_path, count_evaluations):
    # Two choices and a budget of four: the sampler must come back to a point it has seen.
    space = {"lambda": {"type": "categorical", "choices": [0.25, 0.75]}}
    search = {"type": "bayes", "budget": 4, "init_points": 1, "space": space}
    result = run_sweep(sweep_config(tasks, tmp_path, search=search))
    assert sorted(p["params"]["lambda"] for p in result.points) == [0.25, 0.75]
    assert len(count_evaluations) == result.evaluated == 2
    assert json.loads(result.path.read_text())["search"]["budget"] == 4


def test_one_value_grid_is_one_point(tasks, tmp_path, count_evaluations):
    result = run_sweep(sweep_config(tasks, tmp_path, search={"type": "grid", "grid": {"lambda": [0.5]}}))
    assert [p["params"]["lambda"] for p in result.points] == [0.5] and count_evaluations == [{"lambda": 0.5}]
