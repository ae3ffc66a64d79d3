"""``scripts/bench_llm.py`` runs its CPU path end to end on a tiny shape: every case in its own
process, a result for each, the table and the target lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_llm.py"


@pytest.mark.slow
def test_bench_llm_runs_every_case_on_a_tiny_shape(tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, str(SCRIPT), "--shape", "tiny", "--n", "3", "--steps", "1", "--warmup", "0"]
    done = subprocess.run(
        [*command, "--eval-batches", "1", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    errors = {case: r["error"] for case, r in results.items() if "error" in r}
    assert not errors
    assert {"limit", "fused", "merge:task_vector", "merge:ties", "eval:base", "eval:folded", "eval:fused"} <= set(
        results
    )
    assert results["fused"]["step_ms"] > 0 and results["fused"]["peak_mb"] > 0
    assert results["merge:task_vector"]["saved_mb"] > 0 and results["eval:folded"]["tokens_per_s"] > 0
    assert "| fused |" in done.stdout and "fused step" in done.stdout and "memory model" in done.stdout
