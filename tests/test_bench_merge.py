"""``scripts/bench_merge.py``'s summing up of rounds: the fastest run's times, the median run's
memory, and ratios to the linear save paired round by round."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_merge.py"
spec = importlib.util.spec_from_file_location("bench_merge", SCRIPT)
bench_merge = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench_merge  # its dataclasses look their module up there
spec.loader.exec_module(bench_merge)


def _run(case: str, seconds: float, allocated: float) -> dict:
    return {
        "case": case,
        "n": 8,
        "seconds": seconds,
        "cpu_seconds": 2 * seconds,
        "baseline_mb": 100.0,
        "peak_mb": 100.0 + allocated,
        "file_backed_mb": 0.0,
    }


def test_rounds_pair_each_case_with_the_linear_save_of_its_own_round():
    # Round 2 was a busy spell for both cases; the fastest runs come from different rounds.
    linear = bench_merge.summary([_run("lmerge:task_vector", s, 20) for s in (0.30, 0.60, 0.25)])
    merge = bench_merge.summary([_run("lmerge:tsv", s, m) for s, m in ((0.54, 30), (1.08, 26), (0.55, 28))])
    assert merge["seconds"] == 0.54 and merge["peak_mb"] == 128.0  # fastest run; median memory
    assert merge["round_seconds"] == [0.54, 1.08, 0.55]
    # Per round 1.8, 1.8 and 2.2: the median is 1.8, where the fastest runs give 0.54 / 0.25 = 2.16.
    assert abs(bench_merge.median_round_ratio(merge, linear) - 1.8) < 1e-12
    rows = bench_merge.table([linear, merge]).splitlines()
    assert "median of rounds" in rows[0]
    cells = [cell.strip() for cell in rows[3].split("|")]
    assert cells[1] == "lmerge:tsv" and cells[10] == "2.16" and cells[11] == "1.80"


def test_a_case_without_rounds_has_no_paired_ratio():
    assert bench_merge.median_round_ratio({"seconds": 1.0}, {"round_seconds": [0.5]}) is None
