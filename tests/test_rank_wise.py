"""Rank-wise coefficients (``granularity: rank_wise``): the ``weighted_rank`` method, the fused
model's gradient against a dense float64 reference, every learner training them, their decay,
restore and TensorBoard statistics, and the export that ``lmerge merge`` reproduces exactly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from test_learners import assert_saved_merge_is_the_learned_model, fit

from lmerge.__main__ import main
from lmerge.adapters import LoraAdapter
from lmerge.adapters.align import align_keys
from lmerge.data import CatalogDataModule
from lmerge.errors import ConfigError, MethodError
from lmerge.learn import AdaMerging, GradientCE, RegretSmoothMax, SuperMerge
from lmerge.learn.callbacks import CoefficientLogger
from lmerge.learn.fused import attach, layer_groups
from lmerge.learn.rank_coefficients import RankCoefficients
from lmerge.methods import ModuleContext, get_method
from lmerge.pipeline import export_learned_merge
from lmerge.tasks.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_weighted_rank_is_the_per_rank_weighted_lora():
    method = get_method("weighted_rank")
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(r, 6, generator=g) for r in (2, 3)]
    Bs = [torch.randn(5, r, generator=g) for r in (2, 3)]
    weights = [[0.5, -1.0], [2.0, 0.0, 0.25]]
    params = method.normalize_params({"rank_weights": {"m": weights}, "allow_negative_coefficients": True}, 2)
    A, B = method.fn(As, Bs, params, ModuleContext("m", None, None))
    assert A.shape == (5, 6) and B.shape == (5, 5)
    expected = sum(B_i @ torch.diag(torch.tensor(w)) @ A_i for w, A_i, B_i in zip(weights, As, Bs))
    torch.testing.assert_close(B @ A, expected)
    with pytest.raises(MethodError, match="rank_weights: no weights for module other"):
        method.fn(As, Bs, params, ModuleContext("other", None, None))
    short = method.normalize_params({"rank_weights": {"m": [[1.0], [1.0, 1.0, 1.0]]}}, 2)
    with pytest.raises(MethodError, match=r"rank_weights.m: adapter 0 has rank 2, got 1 weights"):
        method.fn(As, Bs, short, ModuleContext("m", None, None))


@pytest.mark.parametrize(
    "table,message",
    [
        ({"m": [[1.0, -1.0], [1.0]]}, r"rank_weights.m: adapter 0: negative weight"),
        ({"m": [[1.0]]}, r"rank_weights.m: expected 2 lists \(one per adapter\)"),
        ({"m": [[1.0], ["x"]]}, r"rank_weights.m: adapter 1: expected a list of finite numbers"),
        ([1.0], r"rank_weights: expected a mapping"),
        ("{m: [[1.0], [oops}", r"rank_weights: cannot parse"),
    ],
)
def test_weighted_rank_parameters_are_checked_in_one_line(table, message):
    with pytest.raises(MethodError, match=message):
        get_method("weighted_rank").normalize_params({"rank_weights": table}, 2)


def fused_bert(zoo, names, dtype, mixing=False):
    """The tiny BERT in ``dtype`` with adapters ``names`` fused, and rank-wise tanh coefficients
    with random (non-zero) values and offsets (and rank-mixing matrices, with ``mixing``)."""
    adapters = [LoraAdapter(zoo[name]) for name in names]
    keys, _ = align_keys(adapters, "common")
    group_names, _, group_of = layer_groups(keys, "rank_wise")
    ranks = {key: [a.shapes[key].rank for a in adapters] for key in keys}
    coefficients = RankCoefficients(
        len(adapters), len(group_names), "tanh", 0.3, group_names, ranks, {k: group_of(k) for k in keys}, 0.0, mixing
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        coefficients.raw.copy_(torch.randn(coefficients.raw.shape, generator=g))
        coefficients.offsets.copy_(torch.randn(coefficients.offsets.shape, generator=g) * 0.5)
        for matrix in coefficients.mixing or []:
            matrix.copy_(torch.randn(matrix.shape, generator=g) * 0.3)
    model = load_model(str(zoo["bert"]), "classification", dtype).eval()
    fused = attach(model, adapters, keys, coefficients, group_of, dtype=dtype)
    return fused, adapters, keys, group_of


@pytest.mark.parametrize("rows", [4, 48], ids=["factor_path", "folded_path"])
def test_rank_wise_gradient_matches_a_dense_float64_reference(zoo, rows):
    """Adapters of mixed ranks and scalings (bert_d: one module of rank 2; bert_c: rslora): the
    gradients of the layer coefficients and of every rank offset equal those of the dense model
    ``W + sum_i B_i diag(c_i s_i) A_i`` built in float64 from the same parameters."""
    fused, adapters, keys, group_of = fused_bert(zoo, ["bert_a", "bert_c", "bert_d"], torch.float64)
    coefficients = fused.coefficients
    batch = {"input_ids": torch.randint(5, 100, (2, rows // 2)), "attention_mask": torch.ones(2, rows // 2, dtype=int)}
    weights = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert any(m.folds(torch.zeros(rows, 32)) for m in fused.modules.values()) == (rows == 48)

    def loss_of(model, parameters=None):
        out = torch.func.functional_call(model, parameters or {}, (), batch) if parameters else model(**batch)
        return (out.logits * weights).sum()

    grads = torch.autograd.grad(loss_of(fused.model), [coefficients.raw, coefficients.offsets])

    reference = load_model(str(zoo["bert"]), "classification", torch.float64).eval().requires_grad_(False)
    values = coefficients()  # the same float32 parametrization; everything after it in float64
    merged = {}
    for key in keys:
        start, deltas = coefficients.row_start(key), []
        for index, adapter in enumerate(adapters):
            A, B = (t.double() for t in adapter.factors(key))
            rank = A.shape[0]
            c = values[group_of(key), index] + coefficients.offsets[start : start + rank]
            deltas.append(adapter.scaling(key) * (B * c.double()) @ A)
            start += rank
        merged[f"{key}.weight"] = reference.get_submodule(key).weight + sum(deltas)
    expected = torch.autograd.grad(loss_of(reference, merged), [coefficients.raw, coefficients.offsets])
    for got, want in zip(grads, expected):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_rank_mixing_gradient_matches_a_dense_float64_reference(zoo):
    """With rank mixing, the gradients of the layer coefficients, the rank offsets and every
    module's mixing matrix ``N`` equal those of the dense float64 model
    ``W + B_s (diag(c) + N) A_cat``, ``B_s = [s_1 B_1 ... s_n B_n]`` (mixed ranks, rslora), on a
    batch the plain rank-wise model would fold (the mixing takes the factor path)."""
    fused, adapters, keys, group_of = fused_bert(zoo, ["bert_a", "bert_c", "bert_d"], torch.float64, mixing=True)
    coefficients = fused.coefficients
    batch = {"input_ids": torch.randint(5, 100, (2, 24)), "attention_mask": torch.ones(2, 24, dtype=int)}
    weights = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    trained = [coefficients.raw, coefficients.offsets, *coefficients.mixing]

    def loss_of(model, parameters=None):
        out = torch.func.functional_call(model, parameters or {}, (), batch) if parameters else model(**batch)
        return (out.logits * weights).sum()

    grads = torch.autograd.grad(loss_of(fused.model), trained)

    reference = load_model(str(zoo["bert"]), "classification", torch.float64).eval().requires_grad_(False)
    values = coefficients()
    merged = {}
    for slot, key in enumerate(keys):
        start = coefficients.row_start(key)
        factors = [[t.double() for t in adapter.factors(key)] for adapter in adapters]
        c = (
            torch.cat([values[group_of(key), i].expand(A.shape[0]) for i, (A, _) in enumerate(factors)])
            + coefficients.offsets[start : start + sum(A.shape[0] for A, _ in factors)]
        )
        B_s = torch.cat([adapter.scaling(key) * B for adapter, (_, B) in zip(adapters, factors)], dim=1)
        A_cat = torch.cat([A for A, _ in factors], dim=0)
        mixing = coefficients.mixing[slot]
        assert mixing is coefficients.mixing_matrix(start)
        merged[f"{key}.weight"] = reference.get_submodule(key).weight + B_s @ (torch.diag(c.double()) + mixing) @ A_cat
    expected = torch.autograd.grad(loss_of(reference, merged), trained)
    for got, want in zip(grads, expected):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_weighted_rank_with_rank_mixing_is_the_mixed_lora():
    method = get_method("weighted_rank")
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(r, 6, generator=g, dtype=torch.float64) for r in (2, 3)]
    Bs = [torch.randn(5, r, generator=g, dtype=torch.float64) for r in (2, 3)]
    weights = [[0.5, 1.0], [2.0, 0.0, 0.25]]
    mixing = torch.randn(5, 5, generator=g, dtype=torch.float64)
    params = method.normalize_params({"rank_weights": {"m": weights}, "rank_mixing": {"m": mixing.tolist()}}, 2)
    A, B = method.fn(As, Bs, params, ModuleContext("m", None, None))
    B_s, A_cat = torch.cat(Bs, dim=1), torch.cat(As, dim=0)
    expected = B_s @ (torch.diag(torch.tensor(sum(weights, []), dtype=torch.float64)) + mixing) @ A_cat
    torch.testing.assert_close(B @ A, expected, rtol=1e-12, atol=1e-12)
    wrong = method.normalize_params({"rank_weights": {"m": weights}, "rank_mixing": {"m": [[1.0]]}}, 2)
    with pytest.raises(MethodError, match=r"rank_mixing.m: a 1 x 1 matrix for rank 5"):
        method.fn(As, Bs, wrong, ModuleContext("m", None, None))
    with pytest.raises(MethodError, match=r"rank_mixing.m: expected a square matrix"):
        method.normalize_params({"rank_weights": {"m": weights}, "rank_mixing": {"m": [[1.0, 2.0]]}}, 2)


def test_rank_mixing_is_refused_without_rank_wise_and_left_out_of_the_own_adapter_pass(tasks):
    with pytest.raises(ConfigError, match="model.rank_mixing_lr: a positive learning rate with granularity rank_wise"):
        SuperMerge(str(tasks), ["alpha", "beta"], variant="layer_wise", rank_mixing_lr=0.01)
    learner = SuperMerge(str(tasks), ["alpha", "beta"], variant="rank_wise", targets="adapters", rank_mixing_lr=0.01)
    learner.configure_model()
    data = CatalogDataModule(str(tasks), ["alpha", "beta"], fit_split="train", batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader().iterables["alpha"]))
    before = learner.own_adapter_logits("alpha", batch)
    merged_before = learner.task_logits("alpha", batch)
    snapshot = learner.coefficients.snapshot()
    with torch.no_grad():
        for matrix in learner.coefficients.mixing:
            matrix.normal_(0, 0.5)
    learner.own_logits_seen.clear()  # a fresh pass, not the kept logits
    torch.testing.assert_close(learner.own_adapter_logits("alpha", batch), before)  # the teacher has no N
    assert not torch.allclose(learner.task_logits("alpha", batch), merged_before)  # the merge has
    learner.coefficients.restore(snapshot)
    torch.testing.assert_close(learner.task_logits("alpha", batch), merged_before)
    optimizer = learner.configure_optimizers()
    assert [group["lr"] for group in optimizer.param_groups] == [learner.hparams.lr, 0.01]


RANK_WISE = [
    (AdaMerging, "test", {"granularity": "rank_wise", "lr": 0.05}),
    # Unconstrained, as configs/gradient.yaml learns it.
    (
        GradientCE,
        "validation",
        {"granularity": "rank_wise", "parametrization": "none", "ce_baseline_batches": 1, "lr": 0.05},
    ),
    (SuperMerge, "validation", {"variant": "rank_wise", "lr": 0.05}),
    (RegretSmoothMax, "validation", {"granularity": "rank_wise", "baseline_batches": 1}),
]


@pytest.mark.parametrize("learner_class,split,options", RANK_WISE, ids=[c[0].__name__ for c in RANK_WISE])
def test_every_learner_learns_rank_wise_coefficients(tasks, tmp_path, learner_class, split, options):
    learner = learner_class(str(tasks), ["alpha", "beta"], ["alpha", "beta"], **options)
    assert isinstance(learner.coefficients, RankCoefficients)
    fit(learner, CatalogDataModule(str(tasks), ["alpha", "beta"], fit_split=split, batch_size=4), 2, tmp_path)
    offsets = learner.coefficients.offsets.detach()
    assert offsets.abs().sum() > 0  # the rank directions moved apart from their layer's coefficient
    spec = learner.merge_spec()
    assert spec["method"] == "weighted_rank" and set(spec["method_params"]["rank_weights"]) == set(learner.keys)


@pytest.mark.parametrize("mixing_lr", [None, 0.05], ids=["rank_wise", "rank_mixing"])
def test_rank_wise_export_is_reproduced_exactly_by_lmerge_merge(zoo, tasks, tmp_path, capsys, mixing_lr):
    learner = SuperMerge(
        str(tasks), ["alpha", "beta"], ["alpha", "beta"], variant="rank_wise", lr=0.2, rank_mixing_lr=mixing_lr
    )
    fit(learner, CatalogDataModule(str(tasks), ["alpha", "beta"], fit_split="validation", batch_size=4), 3, tmp_path)
    bundle = export_learned_merge(learner, str(tmp_path / "out"))
    spec_file = bundle / "merge_spec.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    assert spec["method"] == "weighted_rank"
    first = spec["method_params"]["rank_weights"]["bert.encoder.layer.0.attention.self.query"][0]
    assert len(set(first)) == len(first)  # one coefficient per rank direction, all different
    assert ("rank_mixing" in spec["method_params"]) == (mixing_lr is not None)
    assert (bundle / "coefficients.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["merge", "--config", str(spec_file), "--output_dir", str(tmp_path / "merged")]) == 0, (
        capsys.readouterr().err
    )
    saved = next((tmp_path / "merged").rglob("adapter_config.json")).parent
    batch, learned = assert_saved_merge_is_the_learned_model(zoo, learner, saved)
    with torch.no_grad():
        learner.fused.fold()  # and the fold is the same merge
        torch.testing.assert_close(learner.task_logits("alpha", batch), learned, atol=1e-5, rtol=1e-4)


def test_rank_wise_decay_pulls_toward_the_layer_coefficient_and_the_best_ones_are_restored(tasks, tmp_path):
    class Spy(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append((float(outputs["loss"]), pl_module.coefficients.snapshot()))

    def train(decay, **options):
        learner = SuperMerge(
            str(tasks),
            ["alpha", "beta"],
            ["alpha", "beta"],
            variant="rank_wise",
            lr=0.2,
            rank_wise_decay=decay,
            **options,
        )
        data = CatalogDataModule(str(tasks), ["alpha", "beta"], fit_split="validation", batch_size=4)
        spy = Spy()
        return learner, fit(learner, data, 4, tmp_path, callbacks=[spy]), spy

    free, _, _ = train(0.0)
    pulled, trainer, _ = train(50.0)
    offsets = pulled.coefficients.offsets
    assert offsets.abs().sum() < free.coefficients.offsets.abs().sum()
    assert "train/rank_wise_decay" in trainer.callback_metrics
    torch.testing.assert_close(pulled.coefficients.penalty(), 50.0 * offsets.square().sum())
    assert free.coefficients.penalty() is None
    restored, _, spy = train(0.0, restore_best_checkpoint=True)
    _, best = min(spy.seen, key=lambda seen: seen[0])
    assert restored.coefficients.snapshot() == best and best != spy.seen[-1][1]


def test_tensorboard_holds_each_layers_rank_mean_and_spread(tasks, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learner = AdaMerging(str(tasks), ["alpha", "beta"], ["alpha", "beta"], granularity="rank_wise", lr=0.05)
    data = CatalogDataModule(str(tasks), ["alpha", "beta"], fit_split="test", batch_size=4)
    trainer = fit(learner, data, 2, tmp_path, callbacks=[CoefficientLogger(1, 1)])
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    scalars = events.Tags()["scalars"]
    for group in learner.coefficients.group_names:
        for adapter in ("alpha", "beta"):
            assert {f"coefficients/{group}/{adapter}/rank_{s}" for s in ("mean", "std")} <= set(scalars)
    assert "coefficients/heatmap" in events.Tags()["images"]
    statistics = learner.coefficients.rank_statistics()
    values = learner.coefficients.rank_values().detach()
    rows = (learner.coefficients.row_group == 0) & (learner.coefficients.row_adapter == 1)
    mean, std = statistics["layer.0"][1]
    assert mean == pytest.approx(float(values[rows].mean()), abs=1e-6)
    assert std == pytest.approx(float(values[rows].std(unbiased=False)), abs=1e-6)


def test_rank_wise_settings_are_checked(tasks, tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.rank_wise_decay: only granularity rank_wise"):
        GradientCE(str(tasks), ["alpha", "beta"], rank_wise_decay=1.0)
    with pytest.raises(ConfigError, match="model.merge_impl: granularity rank_wise needs fused_lora_linear"):
        GradientCE(str(tasks), ["alpha", "beta"], granularity="rank_wise", merge_impl="dense")
    with pytest.raises(ConfigError, match="model.hierarchical: not with variant rank_wise"):
        SuperMerge(str(tasks), ["alpha", "beta"], variant="rank_wise", hierarchical={"group_size": 1, "stage_steps": 1})
    config = tmp_path / "m.yaml"
    optimizer = (
        "{name: gradient, params: {max_steps: 1, batch_size: 4, ce_baseline_batches: 1, granularity: rank_wise}}"
    )
    config.write_text(
        f"adapters: [alpha, beta]\ncatalog: {tasks}\nmethod: weighted_delta_n\noptimizer: {optimizer}\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    assert main(["merge", "--config", str(config)]) == 2
    assert "it learns weighted_rank weights; set method: weighted_rank" in capsys.readouterr().err
    config.write_text(config.read_text().replace("method: weighted_delta_n", "method: weighted_rank"))
    assert main(["merge", "--config", str(config)]) == 0, capsys.readouterr().err
    run_dir = capsys.readouterr().out.split("run bundle: ")[1].strip()
    meta = json.loads((tmp_path / run_dir / "merge_metadata.json").read_text())
    assert meta["method"] == "weighted_rank" and meta["optimizer"]["steps"] == 1
