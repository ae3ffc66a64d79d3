"""Saved merges load with PEFT / transformers and reproduce a dense reference merge."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from lmerge.adapters import LoraAdapter
from lmerge.merge.config import MergeConfig, SaveConfig
from lmerge.merge.writers import truncated_factors, truncated_svd
from lmerge.pipeline import run_merge

LLAMA = ("llama_a", "llama_b")  # ranks 4 and 8
BERT = ("bert_a", "bert_c")  # rank 4 and rank 2 with rslora


def deltas(zoo, names, key):
    out = []
    for name in names:
        adapter = LoraAdapter(zoo[name])
        A, B = adapter.factors(key)
        out.append(adapter.scaling(key) * B @ A)
    return torch.stack(out)


def factors(zoo, names, key):
    pairs = []
    for name in names:
        adapter = LoraAdapter(zoo[name])
        A, B = adapter.factors(key)
        pairs.append((A, adapter.scaling(key) * B))
    return pairs


# Independent dense references: (method, params, reference(zoo, names, key) -> delta).
REFERENCES = {
    "task_vector": ({"lambda": 0.7}, lambda d: 0.7 * d.sum(0)),
    "uniform_delta": ({}, lambda d: d.mean(0)),
    "uniform_scalar_delta": ({"scale": 0.4}, lambda d: 0.4 * d.sum(0)),
    "weighted_delta": ({"lambda": 0.3}, lambda d: 0.3 * d[0] + 0.7 * d[1]),
    "weighted_delta_n": ({"weights": [0.2, 0.9]}, lambda d: 0.2 * d[0] + 0.9 * d[1]),
    "ties": (
        {"k": 30, "lambda": 0.8},
        lambda d: merge_utils.ties(d, torch.full((len(d),), 0.8), density=0.3, majority_sign_method="total"),
    ),
    "magnitude_prune": (
        {"k": 40, "lambda": 1.0},
        lambda d: merge_utils.magnitude_prune(d, torch.full((len(d),), 1.0 / len(d)), density=0.4),
    ),
}


def reference_model(zoo, base, auto, names, delta_of):
    model = auto.from_pretrained(zoo[base])
    for key in LoraAdapter(zoo[names[0]]).module_keys:
        with torch.no_grad():
            model.get_submodule(key).weight += delta_of(key)
    return model.eval()


def outputs(model, vocab):
    ids = torch.arange(12).reshape(2, 6) % vocab + 1
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", sorted(REFERENCES))
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_saved_lora_reproduces_reference(zoo, tmp_path, method, family):
    names, auto, vocab = (
        (LLAMA, AutoModelForCausalLM, 128) if family == "llama" else (BERT, AutoModelForSequenceClassification, 100)
    )
    params, reference = REFERENCES[method]
    # Dense methods are saved by SVD at the full rank of the tiny model (32): exact up to float error.
    save = SaveConfig(format="lora", rank=32)
    result = run_merge(
        MergeConfig(
            adapters=[str(zoo[n]) for n in names],
            method=method,
            method_params=params,
            save=save,
            output_dir=str(tmp_path),
        )
    )
    loaded = PeftModel.from_pretrained(auto.from_pretrained(zoo[family]), result.run_dir).eval()
    expected = reference_model(zoo, family, auto, names, lambda key: reference(deltas(zoo, names, key)))
    torch.testing.assert_close(outputs(loaded, vocab), outputs(expected, vocab), atol=1e-4, rtol=1e-4)


def test_linear_save_is_exact_concatenation(zoo, tmp_path):
    result = run_merge(
        MergeConfig(adapters=[str(zoo[n]) for n in LLAMA], method="task_vector", output_dir=str(tmp_path))
    )
    saved = LoraAdapter(result.run_dir)
    key = saved.module_keys[0]
    assert saved.shapes[key].rank == 12  # 4 + 8, no SVD
    assert saved.scaling(key) == 1.0
    assert "svd_relative_error" not in result.saved
    A, B = saved.factors(key)
    torch.testing.assert_close(B @ A, deltas(zoo, LLAMA, key).sum(0))


@pytest.mark.parametrize(
    "method,expected",
    [
        ("uniform", lambda p: (p[0][1] + p[1][1]) / 2 @ ((p[0][0] + p[1][0]) / 2)),
        ("weighted", lambda p: (0.25 * p[0][1] + 0.75 * p[1][1]) @ (0.25 * p[0][0] + 0.75 * p[1][0])),
    ],
)
def test_factor_methods_keep_rank(zoo, tmp_path, method, expected):
    names = ("bert_a", "bert_b")
    params = {"lambda": 0.25} if method == "weighted" else {}
    result = run_merge(
        MergeConfig(
            adapters=[str(zoo[n]) for n in names],
            method=method,
            method_params=params,
            output_dir=str(tmp_path),
        )
    )
    saved = LoraAdapter(result.run_dir)
    for key in saved.module_keys:
        assert saved.shapes[key].rank == 4
        A, B = saved.factors(key)
        torch.testing.assert_close(B @ A, expected(factors(zoo, names, key)))


def test_dense_default_rank_records_svd_error(zoo, tmp_path):
    result = run_merge(MergeConfig(adapters=[str(zoo[n]) for n in LLAMA], method="ties", output_dir=str(tmp_path)))
    saved = LoraAdapter(result.run_dir)
    assert {s.rank for s in saved.shapes.values()} == {8}  # the largest input rank
    errors = json.loads((result.run_dir / "merge_metadata.json").read_text())["save"]["svd_relative_error"]
    assert set(errors) == set(saved.module_keys)
    assert all(0 < e < 1 for e in errors.values())


@pytest.mark.parametrize("method, params", [("task_vector", {}), ("tsv", {}), ("ties", {"space": "core"})])
def test_a_rank_below_a_factor_merge_saves_its_best_approximation_of_that_rank(zoo, tmp_path, method, params):
    """save.rank below the rank of a merge that comes as factors: its best approximation of that
    rank (the truncated SVD of the exact merge), computed from the factors, the error recorded
    (not Iso-C: its flat spectrum has no one best approximation of a lower rank)."""
    adapters = [str(zoo[n]) for n in LLAMA]
    exact = run_merge(MergeConfig(adapters, method, method_params=params, output_dir=str(tmp_path / "exact")))
    cut = run_merge(
        MergeConfig(adapters, method, method_params=params, save=SaveConfig(rank=3), output_dir=str(tmp_path / "cut"))
    )
    whole, saved = LoraAdapter(exact.run_dir), LoraAdapter(cut.run_dir)
    errors = cut.saved["svd_relative_error"]
    assert cut.saved["svd_rank"] == 3 and "svd_relative_error" not in exact.saved
    for key in whole.module_keys:
        assert whole.shapes[key].rank > 3 and saved.shapes[key].rank == 3
        A, B = whole.factors(key)
        U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
        A3, B3 = saved.factors(key)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        assert float((B3.double() @ A3.double() - best).norm() / best.norm()) < 1e-5
        assert errors[key] == pytest.approx(float(S[3:].norm() / S.norm()), rel=1e-4)


def test_a_linear_merge_at_a_lower_rank_is_peft_svd_combination(zoo, tmp_path):
    """task_vector at save.rank 3: the same merged weights as PEFT's ``add_weighted_adapter`` of
    ``combination_type="svd"`` at ``svd_rank`` 3 (a dense SVD of the summed deltas), from factors."""
    adapters = [str(zoo[n]) for n in LLAMA]
    result = run_merge(MergeConfig(adapters, "task_vector", save=SaveConfig(rank=3), output_dir=str(tmp_path)))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama"]), adapters[0], adapter_name="a")
    model.load_adapter(adapters[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "svd", combination_type="svd", svd_rank=3)
    model.set_adapter("svd")
    expected = model.merge_and_unload().state_dict()
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama"]), result.run_dir)
    merged = ours.merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(zoo["llama"]).state_dict()
    changed = [name for name in expected if not torch.equal(expected[name], base[name])]
    assert changed
    for name in changed:  # each module's update, to float32 SVD precision (2e-5 at most here)
        update, reference = merged[name] - base[name], expected[name] - base[name]
        assert float((update - reference).norm() / reference.norm()) < 1e-4, name


def test_truncated_svd_is_the_same_whatever_the_global_random_state():
    """The randomized SVD draws its test matrix from its own seeded generator: a flat spectrum's
    top directions (a DARE merge's) depend on the draw, and the same merge must save the same LoRA."""
    delta = torch.randn(60, 50, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    first = truncated_svd(delta, 8)
    torch.manual_seed(2)
    torch.randn(100)
    second = truncated_svd(delta, 8)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2] == second[2]


def test_truncated_svd_error_is_the_true_error_and_near_the_best():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(200, 64, generator=g))
    delta = (U * 0.8 ** torch.arange(64.0)) @ V.T + 1e-3 * torch.randn(300, 200, generator=g)
    A, B, error = truncated_svd(delta, 8)
    assert A.shape == (8, 200) and B.shape == (300, 8)
    true_error = float((delta - B @ A).norm() / delta.norm())
    assert error == pytest.approx(true_error, rel=1e-3)
    singular = torch.linalg.svdvals(delta)
    best = float(singular[8:].norm() / singular.norm())
    assert best <= true_error < best * 1.01


def test_an_exact_truncation_reports_an_error_near_zero():
    """At or above a matrix's rank the truncation is exact: the error reported is the residual's
    (float32 rounding, about 1e-7), not the rounding of ||delta||^2 - ||B A||^2 magnified by a
    square root (about 3e-4)."""
    g = torch.Generator().manual_seed(1)
    B0, A0 = torch.randn(300, 6, generator=g), torch.randn(6, 200, generator=g)
    A, B, error = truncated_svd(B0 @ A0, 8)
    assert error < 1e-5 and error == pytest.approx(float((B0 @ A0 - B @ A).norm() / (B0 @ A0).norm()), abs=1e-7)
    A, B, error = truncated_factors(A0, B0, 6)
    assert error == 0.0
    A, B, error = truncated_factors(A0, B0, 5)
    singular = torch.linalg.svdvals((B0 @ A0).double())
    assert error == pytest.approx(float(singular[5:].norm() / singular.norm()), rel=1e-5)


def test_full_save_matches_lora_save(zoo, tmp_path):
    names = [str(zoo[n]) for n in LLAMA]
    full = run_merge(
        MergeConfig(adapters=names, method="dare", save=SaveConfig(format="full"), output_dir=str(tmp_path))
    )
    lora = run_merge(MergeConfig(adapters=names, method="dare", save=SaveConfig(rank=32), output_dir=str(tmp_path)))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama"]), lora.run_dir)
    full_model = AutoModelForCausalLM.from_pretrained(full.run_dir)
    torch.testing.assert_close(outputs(full_model.eval(), 128), outputs(peft_model.eval(), 128), atol=1e-4, rtol=1e-4)


def test_full_save_of_classifiers_keeps_backbone_and_heads(zoo, tmp_path):
    names = [str(zoo[n]) for n in BERT]
    full = run_merge(
        MergeConfig(adapters=names, method="task_vector", save=SaveConfig(format="full"), output_dir=str(tmp_path))
    )
    backbone = AutoModel.from_pretrained(full.run_dir)
    assert type(backbone).__name__ == "BertModel"
    assert sorted(p.name for p in (full.run_dir / "heads").iterdir()) == [
        "bert_a.safetensors",
        "bert_c.safetensors",
    ]
    key = "encoder.layer.0.attention.self.query"
    base = AutoModel.from_pretrained(zoo["bert"])
    expected = base.get_submodule(key).weight + deltas(zoo, BERT, f"bert.{key}").sum(0)
    torch.testing.assert_close(backbone.get_submodule(key).weight, expected)


@pytest.mark.parametrize("method", ["ties", "dare", "task_vector"])
def test_worker_threads_give_the_serial_merge_in_order(zoo, method):
    from lmerge.adapters.align import align_keys
    from lmerge.merge.engine import merge_modules
    from lmerge.merge.policies import build_policy
    from lmerge.methods import get_method

    adapters = [LoraAdapter(zoo[name]) for name in LLAMA]
    keys, _ = align_keys(adapters, "common")
    spec = get_method(method)
    params = spec.normalize_params({}, len(adapters))
    policy = build_policy("scalar", spec, params)
    threads = torch.get_num_threads()
    serial = list(merge_modules(adapters, keys, spec, params, policy, workers=1))
    pooled = list(merge_modules(adapters, keys, spec, params, policy, workers=3))
    assert torch.get_num_threads() == threads
    assert [m.key for m in pooled] == keys
    for one, other in zip(serial, pooled, strict=True):
        assert torch.equal(one.dense(), other.dense())


def test_a_worker_error_reaches_the_caller_and_restores_threads(zoo):
    from lmerge.adapters.align import align_keys
    from lmerge.merge.engine import merge_modules
    from lmerge.merge.policies import build_policy
    from lmerge.methods import get_method

    adapters = [LoraAdapter(zoo[name]) for name in LLAMA]
    keys, _ = align_keys(adapters, "common")
    spec = get_method("ties")
    params = spec.normalize_params({}, len(adapters))
    threads = torch.get_num_threads()

    def failing(module):
        raise RuntimeError(f"cannot prepare {module.key}")

    merged = merge_modules(
        adapters, keys, spec, params, build_policy("scalar", spec, params), prepare=failing, workers=2
    )
    with pytest.raises(RuntimeError, match="cannot prepare"):
        list(merged)
    assert torch.get_num_threads() == threads
