"""Evaluation: metrics against independent computations, baselines cached, the output layout."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lmerge.data import load_task_catalog
from lmerge.merge.config import MergeConfig, SaveConfig
from lmerge.pipeline import run_merge


def rows(catalog, task, split="test"):
    spec = load_task_catalog(catalog)[task]
    path = catalog.parent / spec.dataset["data_files"][split]
    return spec, json.loads(path.read_text())


def classification_accuracy(model, tokenizer, spec, data):
    batch = tokenizer([r["text"] for r in data], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    labels = torch.tensor([spec.label_names.index(r["label"]) for r in data])
    return float((predicted == labels).float().mean())


def set_head(model, head):
    state = {k.removeprefix("base_model.model."): v for k, v in head.items()}
    model.classifier.weight.data.copy_(state["classifier.weight"])
    model.classifier.bias.data.copy_(state["classifier.bias"])


@pytest.mark.parametrize(
    ("method", "params", "rank"),
    # A dense merge saved at rank 1, its truncated SVD: the score is the saved adapter's.
    [("task_vector", {"lambda": 0.5}, None), ("ties", {"k": 60.0}, 1)],
)
def test_merge_with_evaluation_matches_peft(zoo, tasks, tmp_path, method, params, rank):
    config = MergeConfig(
        adapters=["alpha", "beta"],
        catalog=str(tasks),
        method=method,
        method_params=params,
        eval_tasks=["alpha", "beta"],
        output_dir=str(tmp_path),
        save=SaveConfig(rank=rank),
    )
    result = run_merge(config)
    tokenizer = AutoTokenizer.from_pretrained(zoo["bert"])
    for task in ("alpha", "beta"):
        spec, data = rows(tasks, task)
        single_model = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(zoo["bert"]), spec.adapter
        ).eval()
        single = classification_accuracy(single_model, tokenizer, spec, data)
        merged_model = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(zoo["bert"]), result.run_dir
        ).eval()
        set_head(merged_model.base_model.model, load_file(result.run_dir / "heads" / f"{task}.safetensors"))
        merged = classification_accuracy(merged_model, tokenizer, spec, data)
        scores = result.evaluation.tasks[task]
        assert scores["single"] == torch.tensor(single).item()
        assert abs(scores["merged"] - merged) < 1e-6
        assert abs(scores["interference_delta"] - (merged - single)) < 1e-6
        assert scores["examples"] == len(data)
    aggregate = result.evaluation.aggregate
    assert aggregate["min_delta"] == min(t["interference_delta"] for t in result.evaluation.tasks.values())


def label_word_accuracy(model, tokenizer, spec, data):
    """Pick the label word with the highest log-likelihood after the prompt (teacher forced)."""
    correct = 0
    for row in data:
        prompt = tokenizer(spec.prompt.format(text=row["text"]))["input_ids"]
        scores = []
        for word in spec.label_names:
            answer = tokenizer(" " + word, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            scores.append(sum(float(log_probs[len(prompt) - 1 + i, t]) for i, t in enumerate(answer)))
        correct += spec.label_names.index(row["label"]) == max(range(len(scores)), key=scores.__getitem__)
    return correct / len(data)


def test_label_tokens_match_peft(zoo, tasks, tmp_path):
    result = run_merge(
        MergeConfig(
            adapters=["yes", "maybe"],
            catalog=str(tasks),
            method="uniform_delta",
            eval_tasks=["yes", "maybe"],
            output_dir=str(tmp_path),
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(zoo["llama"])
    merged_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama"]), result.run_dir).eval()
    for task in ("yes", "maybe"):
        spec, data = rows(tasks, task)
        single_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama"]), spec.adapter)
        scores = result.evaluation.tasks[task]
        assert abs(scores["single"] - label_word_accuracy(single_model.eval(), tokenizer, spec, data)) < 1e-6
        assert abs(scores["merged"] - label_word_accuracy(merged_model, tokenizer, spec, data)) < 1e-6


def test_baselines_are_cached_and_outputs_follow_the_layout(tasks, tmp_path, monkeypatch):
    from lmerge.evaluation.evaluate import Evaluator

    calls = []
    original = Evaluator.score
    monkeypatch.setattr(
        Evaluator, "score", lambda self, task, head: calls.append(task.name) or original(self, task, head)
    )
    config = dict(adapters=["alpha", "beta"], catalog=str(tasks), eval_tasks=["alpha"], output_dir=str(tmp_path))
    first = run_merge(MergeConfig(method="ties", **config))
    assert calls == ["alpha", "alpha"]  # the baseline, then the merge
    second = run_merge(MergeConfig(method="dare", **config))
    assert calls == ["alpha", "alpha", "alpha"]  # the baseline came from the cache
    assert second.evaluation.tasks["alpha"]["single"] == first.evaluation.tasks["alpha"]["single"]

    combo = tmp_path / "merged" / "ties" / "alpha_beta"
    results = json.loads((combo / "eval" / "test" / "eval_results_ties_test.json").read_text())
    assert results["tasks"]["alpha"] == first.evaluation.tasks["alpha"]
    assert (first.run_dir / "eval_results_test.json").is_file()
    link = tmp_path / "alpha" / "metrics" / "eval" / "test" / "merged" / "beta" / "ties" / "metrics.json"
    assert link.is_symlink() and not link.readlink().is_absolute()
    assert json.loads(link.read_text())["merged"] == first.evaluation.tasks["alpha"]["merged"]
    index = json.loads((combo / "eval" / "index.json").read_text())
    assert len(index) == 1 and index[0]["metadata"]["params"] == {"k": 20.0, "lambda": 1.0, "space": "weight"}
    assert set(index[0]["metadata"]) >= {"method_params", "lambda_policy", "transforms", "optimizer"}
    run_merge(MergeConfig(method="ties", method_params={"k": 50}, **config))
    assert len(json.loads((combo / "eval" / "index.json").read_text())) == 2  # appended, not replaced


def test_subset_results_are_namespaced(tasks, tmp_path):
    config = dict(adapters=["alpha", "beta"], catalog=str(tasks), method="ties", output_dir=str(tmp_path))
    full = run_merge(MergeConfig(eval_tasks=["alpha", "beta"], **config))
    subset = {"enabled": True, "max_samples": 8, "seed": 1}
    part = run_merge(MergeConfig(eval_tasks=["alpha", "beta"], eval_subset=subset, **config))
    assert part.evaluation.namespace.startswith("subset_")
    assert all(t["examples"] == 8 for t in part.evaluation.tasks.values())
    test_dir = tmp_path / "merged" / "ties" / "alpha_beta" / "eval" / "test"
    assert json.loads((test_dir / "eval_results_ties_test.json").read_text())["tasks"] == full.evaluation.tasks
    assert (test_dir / part.evaluation.namespace / f"eval_results_ties_test_{part.evaluation.namespace}.json").is_file()
    cached = list((tmp_path / "subsets").glob("alpha_test_*.json"))
    assert len(cached) == 1
    again = run_merge(MergeConfig(eval_tasks=["alpha", "beta"], eval_subset=subset, **config))
    assert again.evaluation.tasks == {
        k: {**v, "seconds": again.evaluation.tasks[k]["seconds"]} for k, v in part.evaluation.tasks.items()
    }


def test_evaluate_command_on_saved_adapter_and_single(tasks, tmp_path, capsys):
    from lmerge.__main__ import main

    out = str(tmp_path / "out")
    assert (
        main(["merge", "--adapters", "[alpha,beta]", "--catalog", str(tasks), "--method", "ties", "--output_dir", out])
        == 0
    )
    run_dir = capsys.readouterr().out.split("run bundle: ")[1].strip()
    assert (
        main(
            [
                "evaluate",
                "--eval_tasks",
                "[alpha,beta]",
                "--catalog",
                str(tasks),
                "--adapter",
                run_dir,
                "--output_dir",
                out,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "alpha" in printed and "min delta" in printed
    assert (
        tmp_path / "out" / "merged" / "ties" / "alpha_beta" / "eval" / "test" / "eval_results_ties_test.json"
    ).is_file()
    assert (tmp_path / "out" / "merged" / "ties" / "alpha_beta" / "runs").is_dir()
    assert main(["evaluate", "--eval_tasks", "[alpha]", "--catalog", str(tasks), "--output_dir", out]) == 0
    assert capsys.readouterr().out.startswith("alpha: accuracy ")
    assert main(["evaluate", "--eval_tasks", "[zeta]", "--catalog", str(tasks), "--output_dir", out]) == 2
    assert "'zeta' is not a task in catalog" in capsys.readouterr().err


def test_seq2seq_label_tokens_match_peft(t5_tasks, tmp_path):
    """An encoder-decoder reads the prompt; the label word with the highest decoder likelihood wins."""
    from transformers import AutoModelForSeq2SeqLM

    result = run_merge(
        MergeConfig(
            adapters=["first", "second"],
            catalog=str(t5_tasks),
            method="task_vector",
            eval_tasks=["first", "second"],
            output_dir=str(tmp_path),
        )
    )
    base = t5_tasks.parent / "t5"
    tokenizer = AutoTokenizer.from_pretrained(base)

    def accuracy(model, spec, data):
        correct = 0
        for row in data:
            prompt = tokenizer(spec.prompt.format(text=row["text"]), return_tensors="pt")
            scores = []
            for word in spec.label_names:
                answer = tokenizer(" " + word, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                with torch.no_grad():
                    logits = model(**prompt, labels=torch.tensor([answer])).logits[0]
                scores.append(float(torch.log_softmax(logits.float(), -1)[range(len(answer)), answer].sum()))
            correct += spec.label_names.index(row["label"]) == max(range(len(scores)), key=scores.__getitem__)
        return correct / len(data)

    merged = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base), result.run_dir).eval()
    for task in ("first", "second"):
        spec, data = rows(t5_tasks, task)
        single = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base), spec.adapter).eval()
        scores = result.evaluation.tasks[task]
        assert abs(scores["single"] - accuracy(single, spec, data)) < 1e-6
        assert abs(scores["merged"] - accuracy(merged, spec, data)) < 1e-6


def test_mixed_precision_evaluation_runs_under_autocast_on_cpu_too(tasks, tmp_path, capsys, monkeypatch):
    from lmerge.__main__ import main

    argv = ["evaluate", "--eval_tasks", "[alpha]", "--catalog", str(tasks), "--output_dir", str(tmp_path)]
    outputs = []
    forward = torch.nn.Linear.forward

    def spy(self, x):  # noqa: ANN001, ANN202
        out = forward(self, x)
        outputs.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    assert main(argv) == 0
    assert set(outputs) == {torch.float32}
    capsys.readouterr()
    outputs.clear()
    assert main([*argv, "--eval_precision", "bf16-mixed"]) == 0
    assert set(outputs) == {torch.bfloat16} and "float32" not in capsys.readouterr().err
    assert main([*argv, "--eval_precision", "64-true"]) == 2
    assert "eval_precision: unknown precision '64-true'" in capsys.readouterr().err


def test_a_macro_f1_task_is_scored_with_macro_f1(zoo, tasks, tmp_path):
    """The catalog's metric decides the score (not the DataModule's data-only spec)."""
    import yaml

    from lmerge.evaluation.evaluate import Evaluator
    from lmerge.tasks.spec import catalog_tasks

    spec, data = rows(tasks, "alpha")
    entry = {"adapter": spec.adapter, "dataset": spec.dataset, "label_names": spec.label_names, "metric": "macro_f1"}
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": {"alpha": entry}}))
    evaluator = Evaluator(catalog_tasks(catalog, ["alpha"]), "test", output_root=tmp_path / "out")
    value = evaluator.baseline(evaluator.tasks[0])["value"]

    tokenizer = AutoTokenizer.from_pretrained(zoo["bert"])
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(zoo["bert"]), spec.adapter)
    batch = tokenizer([r["text"] for r in data], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = model.eval()(**batch).logits.argmax(-1)
    labels = torch.tensor([spec.label_names.index(r["label"]) for r in data])
    f1 = []
    for c in range(len(spec.label_names)):
        hits, predicted_c, actual_c = (
            int(((predicted == c) & (labels == c)).sum()),
            int((predicted == c).sum()),
            int((labels == c).sum()),
        )
        f1.append(2 * hits / (predicted_c + actual_c) if predicted_c + actual_c else 0.0)
    accuracy = float((predicted == labels).float().mean())
    assert abs(value - sum(f1) / len(f1)) < 1e-6 and abs(value - accuracy) > 1e-3
