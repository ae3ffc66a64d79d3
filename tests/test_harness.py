"""lm-evaluation-harness as an evaluation backend, on a local harness task (a YAML over a tiny
JSON dataset written here) and the tiny random word Llama: its results against direct
``lm_eval.simple_evaluate`` calls, its baselines, records and errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import ANSWERS, TOPICS, WORDS
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmerge.errors import ConfigError
from lmerge.evaluation.evaluate import Evaluator
from lmerge.evaluation.harness import HarnessConfig, HarnessSuite

TASK, LIMIT = "tiny_choice", 10
TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}} Answer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def harness_tasks(tmp_path_factory):
    """A folder holding the local multiple-choice task ``tiny_choice`` (16 questions, 3 choices)."""
    root = tmp_path_factory.mktemp("harness_tasks")
    rng = random.Random(0)
    rows = [
        {"question": " ".join(rng.choices(WORDS, k=4)), "choices": rng.sample(ANSWERS + TOPICS, 3), "answer": i % 3}
        for i in range(16)
    ]
    data = root / "data" / "tiny.json"
    data.parent.mkdir()
    data.write_text(json.dumps(rows))
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))
    return root / "tasks"


def harness_config(folder, **fields) -> HarnessConfig:
    return HarnessConfig(tasks=[TASK], include_path=str(folder), include_defaults=False, limit=LIMIT, **fields)


def direct(model, base, folder) -> dict[str, float]:
    """The task's metrics from a plain ``lm_eval.simple_evaluate`` call on ``model``."""
    model = model.eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(base), batch_size=8)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    with torch.no_grad():
        results = simple_evaluate(model=lm, tasks=[TASK], limit=LIMIT, task_manager=manager, log_samples=False)
    values = results["results"][TASK]
    return {key: value for key, value in values.items() if key in ("acc,none", "acc_norm,none")}


def merged_peft(base, adapter):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()


def test_harness_scores_equal_a_direct_simple_evaluate_call(word_llama, harness_tasks):
    base = word_llama["base"]
    model = merged_peft(base, word_llama["first"]).eval()
    suite = HarnessSuite(harness_config(harness_tasks), word_llama["base"].parent / "unused", str(base), "32-true")
    with torch.inference_mode():
        [score] = suite.score(model).values()
    assert score.metrics == direct(model, base, harness_tasks)
    assert score.examples == LIMIT and score.higher_is_better == {"acc": True, "acc_norm": True}
    assert score.primary(TASK, None)[:2] == ("acc", score.metrics["acc,none"])
    assert score.primary(TASK, "acc_norm")[:2] == ("acc_norm", score.metrics["acc_norm,none"])
    with pytest.raises(ConfigError, match=r"eval_harness.metrics.tiny_choice: 'f1' is not a metric of tiny_choice"):
        score.primary(TASK, "f1")


def test_merge_records_harness_metrics_against_each_adapter_alone(word_llama, harness_tasks, tmp_path, capsys):
    """``lmerge merge --eval_harness...`` scores the folded merge and each adapter alone (cached),
    and records the harness task like a catalog task: bundle, eval index, interference table."""
    from lmerge.__main__ import main

    base, out = word_llama["base"], tmp_path / "out"
    adapters = f"[{word_llama['first']},{word_llama['second']}]"
    harness = ["--eval_harness.tasks", f"[{TASK}]", "--eval_harness.include_path", str(harness_tasks)]
    harness += ["--eval_harness.include_defaults", "false", "--eval_harness.limit", str(LIMIT)]
    command = ["merge", "--adapters", adapters, "--method", "task_vector", "--output_dir", str(out), *harness]
    assert main(command) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"{TASK}  acc" in printed and "min delta" in printed
    run_dir = printed.split("run bundle: ")[1].strip()

    singles = {name: direct(merged_peft(base, word_llama[name]), base, harness_tasks) for name in ("first", "second")}
    merged = direct(merged_peft(base, run_dir), base, harness_tasks)
    bundle = json.loads(next((tmp_path / run_dir).glob("eval_results_*.json")).read_text())
    row = bundle["tasks"][TASK]
    assert row["metric"] == "acc" and row["source"] == "eval_harness" and row["examples"] == LIMIT
    assert row["harness"]["metrics"] == merged and row["merged"] == merged["acc,none"]
    assert row["harness"]["singles"] == {name: values["acc,none"] for name, values in singles.items()}
    assert row["single"] == max(values["acc,none"] for values in singles.values())
    assert row["interference_delta"] == pytest.approx(row["merged"] - row["single"])
    [entry] = json.loads(next(out.glob("merged/task_vector/*/eval/index.json")).read_text())
    assert entry["tasks"][TASK] == row and entry["aggregate"]["min_delta"] == row["interference_delta"]
    cached = sorted(p.parent.name for p in (out / TASK).glob("metrics/eval/harness/single/*/metrics.json"))
    assert cached == ["first", "second"]

    # Again, and evaluating the saved merge: the baselines come from the cache, the merge is scored anew.
    calls = []
    original = HarnessSuite.score
    HarnessSuite.score = lambda self, model, tasks=None: calls.append(tasks) or original(self, model, tasks)
    try:
        evaluate = ["evaluate", "--adapter", run_dir, "--output_dir", str(out), *harness]
        assert main(evaluate) == 0, capsys.readouterr().err
    finally:
        HarnessSuite.score = original
    assert calls == [None]
    assert f"{TASK}  acc" in capsys.readouterr().out


def test_every_input_of_a_harness_baseline_is_in_its_cache_key(word_llama, harness_tasks, tmp_path, monkeypatch):
    """An adapter's cached harness score is reused only while everything it depends on is the same:
    a change of any one of them changes the key."""
    import shutil

    from lmerge.adapters.lora import LoraAdapter
    from lmerge.evaluation import baseline_key, harness

    def key(adapter=word_llama["first"], config=None, precision="32-true", base=word_llama["base"]) -> dict:
        suite = HarnessSuite(config or harness_config(harness_tasks), tmp_path / "out", str(base), precision)
        return suite._cache_key(LoraAdapter(adapter))

    reference = key()
    assert key() == reference
    other_base = tmp_path / "base"
    shutil.copytree(word_llama["base"], other_base)
    (other_base / "config.json").write_text((other_base / "config.json").read_text().replace("}", ', "x": 1}', 1))
    edited = tmp_path / "edited"
    shutil.copytree(word_llama["first"], edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 2}))
    changes = {
        "adapter weights": key(adapter=word_llama["second"]),
        "adapter config": key(adapter=edited),
        "precision": key(precision="bf16-true"),
        "harness settings": key(
            config=HarnessConfig(tasks=[TASK], include_path=str(harness_tasks), include_defaults=False, limit=LIMIT + 1)
        ),
        "base model": key(base=other_base),
    }
    monkeypatch.setattr(harness, "SCORING_VERSION", "next")
    changes["scoring version"] = key()
    monkeypatch.undo()
    real = baseline_key.package_version
    monkeypatch.setattr(harness, "package_version", lambda name: "9.9" if name == "lmerge" else real(name))
    changes["lmerge version"] = key()
    assert [what for what, changed in changes.items() if changed == reference] == []


def test_harness_settings_and_names_are_checked(word_llama, harness_tasks, tasks, tmp_path, capsys):
    from lmerge.__main__ import main
    from lmerge.tasks.spec import catalog_tasks

    def refused(**fields):
        with pytest.raises(ConfigError) as error:
            HarnessConfig(**{"tasks": [TASK], **fields})
        return str(error.value)

    assert refused(tasks=[]) == "eval_harness.tasks: expected a non-empty list of task names, got []"
    assert refused(limit=0) == "eval_harness.limit: must be a positive count or share, got 0"
    assert refused(num_fewshot=-1) == "eval_harness.num_fewshot: must be an integer >= 0, got -1"
    assert refused(include_path=str(tmp_path / "none")).endswith("is not a directory")
    assert refused(include_defaults=False) == (
        "eval_harness.include_defaults: false leaves no tasks without an include_path"
    )
    assert refused(metrics={"arc_easy": "acc"}) == "eval_harness.metrics.arc_easy: not one of eval_harness.tasks"

    out = str(tmp_path / "out")
    harness = ["--eval_harness.include_path", str(harness_tasks), "--eval_harness.include_defaults", "false"]
    command = ["evaluate", "--adapter", str(word_llama["first"]), "--output_dir", out, *harness]
    assert main([*command, "--eval_harness.tasks", "[tiny_choise]"]) == 2
    assert "eval_harness.tasks: 'tiny_choise' is not a harness task, group or tag; did you mean tiny_choice?" in (
        capsys.readouterr().err
    )
    assert main(["evaluate", "--adapter", str(word_llama["first"]), "--output_dir", out]) == 2
    assert "give --eval_tasks (with --catalog), --eval_harness.tasks, or both" in capsys.readouterr().err
    assert main(["evaluate", "--eval_harness.tasks", f"[{TASK}]", *harness]) == 2
    assert "--eval_harness alone scores a merge: give --adapter or --merge_config" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="eval_harness: it scores a language model, and eval_tasks of kind"):
        Evaluator(catalog_tasks(tasks, ["alpha"]), "test", output_root=out, harness=harness_config(harness_tasks))
    clash = HarnessConfig(tasks=["yes"])
    with pytest.raises(ConfigError, match="eval_harness.tasks: 'yes' is also a catalog task of eval_tasks"):
        Evaluator(catalog_tasks(tasks, ["yes"]), "test", output_root=out, harness=clash)


def test_sweep_ranks_points_by_the_tasks_rank_by_names():
    from lmerge.evaluation.evaluate import Evaluation
    from lmerge.sweep.ranking import point_scores

    evaluation = Evaluation("test", "full")
    for name, delta, source in (("a", -0.1, "eval_tasks"), ("b", 0.3, "eval_tasks"), (TASK, -0.2, "eval_harness")):
        evaluation.tasks[name] = {"interference_delta": delta, "source": source}
    assert point_scores(evaluation) == (-0.2, pytest.approx(0.0))
    assert point_scores(evaluation, "eval_tasks") == (-0.1, pytest.approx(0.1))
    assert point_scores(evaluation, "eval_harness") == (-0.2, -0.2)


@pytest.mark.slow
def test_sweep_over_catalog_and_harness_tasks_ranks_by_the_harness(
    word_llama, harness_tasks, generation_catalog, tmp_path, capsys
):
    from lmerge.__main__ import main
    from lmerge.errors import ConfigError
    from lmerge.sweep import SweepConfig

    harness = {"tasks": [TASK], "include_path": str(harness_tasks), "include_defaults": False, "limit": LIMIT}
    config = tmp_path / "sweep.yaml"
    config.write_text(
        json.dumps(
            {
                "adapters": ["first", "second"],
                "catalog": str(generation_catalog),
                "method": "weighted_delta",
                "search": {"type": "grid", "grid": {"lambda": [0.3, 1.0]}},
                "eval_harness": harness,
                "rank_by": "eval_harness",
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    assert main(["sweep", "--config", str(config)]) == 0, capsys.readouterr().err
    summary = json.loads(next((tmp_path / "out").glob("merged/weighted_delta/*/sweeps/sweep_*.json")).read_text())
    assert summary["identity"]["rank_by"] == "eval_harness" and summary["identity"]["eval_harness"]["tasks"] == [TASK]
    for point in summary["points"]:
        assert set(point["tasks"]) == {"first", "second", TASK}
        assert point["score"] == point["tasks"][TASK]["interference_delta"]
    assert "eval_harness:" in Path(summary["best_config"]).read_text()
    with pytest.raises(ConfigError, match="rank_by: eval_harness ranks by tasks that this sweep does not evaluate"):
        SweepConfig(adapters=["first"], method="uniform", catalog=str(generation_catalog), rank_by="eval_harness")
