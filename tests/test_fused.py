"""The fused LoRA linear against the dense reference and independent merges, gradients, freezing,
fold/unfold/detach, and the exported merge spec reproduced by ``lmerge merge``."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import make_adapter
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lmerge.adapters import LoraAdapter
from lmerge.adapters.align import align_keys
from lmerge.errors import AdapterError, ConfigError
from lmerge.learn.coefficients import Coefficients, export_merge_spec
from lmerge.learn.fused import attach, layer_groups
from lmerge.learn.merged_linear import DenseMergedLinear, FusedLoRALinear, ScaleTable, factor_dtype
from lmerge.merge.config import MergeConfig, SaveConfig
from lmerge.pipeline import run_merge

# base model, auto class, vocabulary size, adapters (unequal ranks; bert_c has rslora, bert_d mixed ranks)
FAMILIES = {
    "bert": ("bert", AutoModelForSequenceClassification, 100, ("bert_a", "bert_c", "bert_d")),
    "llama": ("llama", AutoModelForCausalLM, 128, ("llama_a", "llama_b")),
}


def setup(zoo, family, granularity, parametrization="tanh", dtype=torch.float64):
    """The base model, adapters, keys, grouping and distinct (signed, for tanh) coefficients."""
    base, auto, vocab, names = FAMILIES[family]
    adapters = [LoraAdapter(zoo[name]) for name in names]
    keys, _ = align_keys(adapters, "common")
    group_names, group_layers, group_of = layer_groups(keys, granularity)
    n = len(adapters)
    sign = -1 if parametrization in ("tanh", "none") else 1
    values = [[sign**i * (0.15 + 0.2 * i) + 0.1 * g for i in range(n)] for g in range(len(group_names))]
    coefficients = Coefficients(n, len(group_names), parametrization, values, group_names).to(dtype)
    model = auto.from_pretrained(zoo[base]).to(dtype).eval()
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    return model, adapters, keys, coefficients, group_of, group_layers, ids


def logits(model, ids):
    return model(input_ids=ids).logits


PATHS = {"folded": True, "factor": False}
"""FusedLoRALinear's two forwards, pinned in turn (``folds`` otherwise picks one by the batch's rows)."""


def pin_path(monkeypatch, path):
    monkeypatch.setattr(FusedLoRALinear, "folds", lambda self, rows: PATHS[path])


def relative_error(value, reference):
    value, reference = value.detach().float(), reference.detach().float()
    return float((value - reference).norm() / reference.norm())


def merge_by_hand(model, adapters, keys, values, group_of):
    """W + sum_i c_i s_i B_i A_i written into a copy of ``model``, from the adapters' own factors."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for key in keys:
            weight = merged.get_submodule(key).weight
            for c, adapter in zip(values[group_of(key)], adapters, strict=True):
                A, B = adapter.factors(key)
                weight += c * adapter.scaling(key) * (B.to(weight.dtype) @ A.to(weight.dtype))
    return merged


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("granularity", ["task_wise", "layer_wise"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fused_equals_dense_and_an_independent_merge(zoo, family, granularity, path, monkeypatch):
    pin_path(monkeypatch, path)
    model, adapters, keys, coefficients, group_of, _, ids = setup(zoo, family, granularity)
    by_hand = merge_by_hand(model, adapters, keys, coefficients.values(), group_of)
    dense = copy.deepcopy(model)
    attach(dense, adapters, keys, coefficients, group_of, impl="dense")
    attach(model, adapters, keys, coefficients, group_of)
    assert all(isinstance(model.get_submodule(key), FusedLoRALinear) for key in keys)
    assert all(isinstance(dense.get_submodule(key), DenseMergedLinear) for key in keys)
    with torch.no_grad():
        fused = logits(model, ids)
        torch.testing.assert_close(fused, logits(dense, ids), atol=1e-10, rtol=0)
        torch.testing.assert_close(fused, logits(by_hand, ids), atol=1e-10, rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_coefficient_gradients_equal_the_dense_reference(zoo, family, path, monkeypatch):
    pin_path(monkeypatch, path)
    model, adapters, keys, coefficients, group_of, _, ids = setup(zoo, family, "layer_wise", "sigmoid")
    dense_model, dense_coefficients = copy.deepcopy(model), copy.deepcopy(coefficients)
    attach(model, adapters, keys, coefficients, group_of)
    attach(dense_model, adapters, keys, dense_coefficients, group_of, impl="dense")
    for m, c in ((model, coefficients), (dense_model, dense_coefficients)):
        logits(m, ids).log_softmax(-1)[..., 0].mean().backward()
        assert c.raw.grad is not None and c.raw.grad.abs().min() > 0
    torch.testing.assert_close(coefficients.raw.grad, dense_coefficients.raw.grad, atol=1e-12, rtol=1e-9)


def test_only_the_coefficients_train(zoo):
    model, adapters, keys, coefficients, group_of, _, ids = setup(zoo, "bert", "layer_wise", "clamp", torch.float32)
    coefficients.set_values([0.3, 0.5, 0.7])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fused = attach(model, adapters, keys, coefficients, group_of)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is coefficients.raw
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    logits(model, ids)[:, 0].sum().backward()
    optimizer.step()
    coefficients.project_()
    assert coefficients.values() != [[0.3, 0.5, 0.7]] * 2
    after = dict(fused.detach().named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_fold_unfold_and_detach(zoo):
    model, adapters, keys, coefficients, group_of, group_layers, ids = setup(zoo, "llama", "layer_wise")
    model.model.layers[1].mlp.requires_grad_(False)  # detach must give back these flags too
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        original = logits(model, ids)
        fused_model = attach(model, adapters, keys, coefficients, group_of)
        assert fused_model.group_layers == group_layers == [0, 1]
        assert set(fused_model.modules) == set(keys)
        fused = logits(model, ids)
        fused_model.fold()
        assert all(type(model.get_submodule(key)) is torch.nn.Linear for key in keys)
        torch.testing.assert_close(logits(model, ids), fused, atol=1e-10, rtol=0)
        # Folding again with new values starts from the original weights, not the folded ones.
        coefficients.set_values([[0.5, -0.25], [0.1, 0.9]])
        fused_model.fold()
        refolded = logits(model, ids)
        fused_model.unfold()
        assert all(isinstance(model.get_submodule(key), FusedLoRALinear) for key in keys)
        torch.testing.assert_close(logits(model, ids), refolded, atol=1e-10, rtol=0)
        coefficients.set_values([[-0.4, 0.6], [0.2, 0.3]])
        fused = logits(model, ids)
        fused_model.fold()
        torch.testing.assert_close(logits(model, ids), fused, atol=1e-10, rtol=0)
        assert fused_model.detach() is model
        assert torch.equal(logits(model, ids), original)
    assert all(type(model.get_submodule(key)) is torch.nn.Linear for key in keys)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    with pytest.raises(RuntimeError, match="detached"):
        fused_model.fold()


def test_bfloat16_module_matches_float32(zoo):
    # Per module: the tiny random models amplify bf16 rounding through their layers, whatever the merge.
    model, adapters, keys, coefficients, group_of, _, _ = setup(zoo, "llama", "layer_wise", "sigmoid", torch.bfloat16)
    key = "model.layers.1.mlp.down_proj"
    coefficients.float()
    reference = merge_by_hand(model.float(), adapters, [key], coefficients.values(), group_of).get_submodule(key)
    fused_model = attach(model.bfloat16(), adapters, keys, coefficients, group_of)
    module = fused_model.modules[key]
    assert module.A_cat.dtype == torch.bfloat16 and module.scalings.dtype == torch.float32
    x = torch.randn(4, module.base.in_features, generator=torch.Generator().manual_seed(3))
    y = module(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert relative_error(y, reference(x)) < 1e-2
    y.float().square().mean().backward()
    grad = coefficients.raw.grad
    assert grad.dtype == torch.float32 and grad[1].abs().min() > 0 and not grad[0].any()  # layer 1's group only
    fused_model.fold()
    assert model.get_submodule(key).weight.dtype == torch.bfloat16
    assert relative_error(model.get_submodule(key).weight, reference.weight) < 1e-2


def test_bfloat16_model_with_a_float32_merged_path(zoo):
    model, adapters, keys, coefficients, group_of, _, ids = setup(zoo, "bert", "task_wise", "tanh", torch.bfloat16)
    fused_model = attach(model, adapters, keys, coefficients.float(), group_of, dtype=torch.float32)
    module = fused_model.modules[keys[0]]
    assert module.A_cat.dtype == torch.float32 and module.base.weight.dtype == torch.bfloat16
    assert logits(model, ids).dtype == torch.bfloat16


@pytest.mark.parametrize(("family", "name"), [("bert", "bert_c"), ("llama", "llama_b")])
def test_one_adapter_at_coefficient_one_equals_peft(zoo, family, name):
    base, auto, vocab, _ = FAMILIES[family]
    adapter = LoraAdapter(zoo[name])
    coefficients = Coefficients(1, parametrization="none", init=1.0)
    model = auto.from_pretrained(zoo[base]).eval()
    attach(model, [adapter], adapter.module_keys, coefficients, lambda key: 0)
    peft_model = PeftModel.from_pretrained(auto.from_pretrained(zoo[base]), zoo[name]).eval()
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    # The backbone only: a PEFT classification adapter also brings its own head.
    backbone = model.base_model_prefix
    with torch.no_grad():
        ours = getattr(model, backbone)(input_ids=ids).last_hidden_state
        theirs = getattr(peft_model.base_model.model, backbone)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_layer_groups():
    keys = ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.0.output.dense", "bert.pooler.dense"]
    names, layers, group_of = layer_groups(keys, "layer_wise")
    assert (names, layers) == (["layer.0", "layer.1", "other"], [0, 1, None])
    assert [group_of(key) for key in keys] == [1, 0, 2]
    names, layers, group_of = layer_groups(keys[:2], "layer_wise")
    assert (names, layers) == (["layer.0", "layer.1"], [0, 1])
    with pytest.raises(ConfigError, match="no coefficient group for layer None"):
        group_of("bert.pooler.dense")
    names, layers, group_of = layer_groups(keys, "task_wise")
    assert (names, layers, [group_of(key) for key in keys]) == (["all"], [None], [0, 0, 0])
    with pytest.raises(ConfigError, match="granularity.*'block_wise'.*layer_wise, rank_wise, task_wise"):
        layer_groups(keys, "block_wise")


def test_attach_refuses_what_it_cannot_fuse(zoo):
    model, adapters, keys, coefficients, group_of, _, _ = setup(zoo, "bert", "task_wise", "clamp", torch.float32)
    coefficients.set_values(0.5)
    with pytest.raises(AdapterError, match="no module 'model.layers.0.self_attn.q_proj'"):
        attach(model, adapters, ["model.layers.0.self_attn.q_proj"], coefficients, group_of)
    with pytest.raises(AdapterError, match="module 'bert.encoder' is a BertEncoder; only nn.Linear"):
        attach(model, adapters, ["bert.encoder"], coefficients, group_of)
    with pytest.raises(ConfigError, match="coefficients: 3 per group for 2 adapters"):
        attach(model, adapters[:2], keys, coefficients, group_of)
    with pytest.raises(ConfigError, match="group 1 is out of range"):
        attach(model, adapters, keys, coefficients, lambda key: 1)
    with pytest.raises(ConfigError, match="impl.*'sparse'.*dense, fused_lora_linear"):
        attach(model, adapters, keys, coefficients, group_of, impl="sparse")
    with pytest.raises(AdapterError, match="adapter 'bert_a' has no module 'bert.encoder.layer.0.output.dense'"):
        attach(model, adapters, [*keys, "bert.encoder.layer.0.output.dense"], coefficients, group_of)
    other = copy.deepcopy(model)
    other.bert.encoder.layer[1].attention.self.value = torch.nn.Linear(32, 16)
    with pytest.raises(AdapterError, match=r"layer.1.attention.self.value: adapter 'bert_a' is \[32x32\] .* \[16x32\]"):
        attach(other, adapters, keys, coefficients, group_of)
    assert not any(isinstance(m, FusedLoRALinear) for m in other.modules())

    def nan_in_the_last_module(key):
        if key == keys[-1]:
            raise AdapterError("tensor holds NaN or Inf values")
        return adapters[1].factors(key)

    broken = LoraAdapter(adapters[1].path)
    broken.factors = nan_in_the_last_module
    with pytest.raises(AdapterError, match="NaN"):
        attach(model, [adapters[0], broken, adapters[2]], keys, coefficients, group_of)
    conv1d = LoraAdapter(adapters[0].path)
    conv1d.config["fan_in_fan_out"] = True
    with pytest.raises(AdapterError, match="fan_in_fan_out .*GPT-2 Conv1D"):
        attach(model, [conv1d, *adapters[1:]], keys, coefficients, group_of)
    # Every refusal leaves the model as it was; the NaN one undoes the modules it had already fused.
    assert all(type(model.get_submodule(key)) is torch.nn.Linear for key in keys)
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def pooler_adapters(zoo, tmp_path_factory):
    """Two BERT adapters that also target the pooler, a module without a layer index."""
    root = tmp_path_factory.mktemp("pooler")
    common = {"task_type": "SEQ_CLS", "targets": ["query", "pooler.dense"]}
    return [
        make_adapter(zoo["bert"], root / "p4", seed=11, **common),
        make_adapter(zoo["bert"], root / "p2", seed=12, r=2, alpha=4, use_rslora=True, **common),
    ]


def test_exported_spec_reproduces_the_folded_model(zoo, pooler_adapters, tmp_path):
    adapters = [LoraAdapter(path) for path in pooler_adapters]
    keys, _ = align_keys(adapters, "common")
    group_names, group_layers, group_of = layer_groups(keys, "layer_wise")
    assert "bert.pooler.dense" in keys and group_names == ["layer.0", "layer.1", "other"]
    coefficients = Coefficients(2, 3, "tanh", [[0.6, -0.3], [0.2, 0.8], [-0.5, 0.4]], group_names)
    model = AutoModelForSequenceClassification.from_pretrained(zoo["bert"]).eval()
    fused_model = attach(model, adapters, keys, coefficients, group_of)
    assert fused_model.group_layers == group_layers
    fused_model.fold()

    spec = export_merge_spec(coefficients, [str(path) for path in pooler_adapters], group_layers, signed=True)
    assert spec["method_params"]["weights"] == coefficients.values()[2]
    result = run_merge(MergeConfig(**spec, save=SaveConfig(format="lora"), output_dir=str(tmp_path)))
    merged = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(zoo["bert"]), result.run_dir)
    ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = logits(model, ids), logits(merged.eval(), ids)
    assert not torch.allclose(ours, logits(AutoModelForSequenceClassification.from_pretrained(zoo["bert"]), ids))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _separate_add_forward(module, x):
    """The fused forward with a separate low-rank output and add instead of ``addmm``."""
    rows = x.reshape(-1, x.shape[-1])
    y = module.base(rows) + F.linear(F.linear(rows, module.A_cat) * module.scaled_coefficients(), module.B_cat)
    return y.view(*x.shape[:-1], y.shape[-1])


def _unflattened_forward(module, x):
    """The fused forward on the input's own shape, as lmerge computed it before ``addmm``."""
    return module.base(x) + F.linear(F.linear(x, module.A_cat) * module.scaled_coefficients(), module.B_cat)


def _loss_and_gradient(model, coefficients, ids):
    coefficients.raw.grad = None
    loss = logits(model, ids).log_softmax(-1)[..., 0].mean()
    loss.backward()
    return loss.detach(), coefficients.raw.grad.clone()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_addmm_forward_equals_the_separate_add_bit_for_bit(zoo, family, monkeypatch):
    pin_path(monkeypatch, "factor")
    model, adapters, keys, coefficients, group_of, _, ids = setup(zoo, family, "layer_wise", "sigmoid", torch.float32)
    fused_model = attach(model, adapters, keys, coefficients, group_of)
    table = fused_model._table
    with_table = _loss_and_gradient(model, coefficients, ids)
    assert table.chunks is None  # cleared after the forward: no graph kept alive
    monkeypatch.setattr(table, "fill", lambda coefficients: None)  # each module computes its own c_rep
    per_module = _loss_and_gradient(model, coefficients, ids)
    monkeypatch.setattr(FusedLoRALinear, "forward", _separate_add_forward)
    separate = _loss_and_gradient(model, coefficients, ids)
    assert torch.equal(per_module[0], separate[0]) and torch.equal(per_module[1], separate[1])
    monkeypatch.setattr(FusedLoRALinear, "forward", _unflattened_forward)
    unflattened = _loss_and_gradient(model, coefficients, ids)
    # The loss is the same bit for bit; the gradients sum the same terms in another order (the
    # backward graph's shape decides in which order q, k and v return their input gradients).
    for result in (with_table, per_module):
        assert torch.equal(result[0], unflattened[0])
        torch.testing.assert_close(result[1], unflattened[1], rtol=1e-5, atol=1e-9)


def test_autocast_runs_the_low_rank_path_in_half_with_float32_coefficients(zoo):
    """What ``bf16-mixed`` does on a GPU, emulated with CPU autocast: bf16 GEMMs, c_rep applied in
    float32, float32 coefficient gradients close to the float32 ones."""
    model, adapters, keys, coefficients, group_of, _, _ = setup(zoo, "llama", "layer_wise", "sigmoid", torch.float32)
    module = attach(model, adapters, keys, coefficients, group_of).modules["model.layers.1.mlp.down_proj"]
    x = torch.randn(3, 4, module.base.in_features, generator=torch.Generator().manual_seed(1))
    module(x).square().mean().backward()
    reference, coefficients.raw.grad = coefficients.raw.grad.clone(), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert coefficients.raw.grad.dtype == torch.float32
    assert relative_error(coefficients.raw.grad, reference) < 3e-2


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_folded_path_gives_the_factor_paths_output_and_gradients(zoo, family):
    """Same output, input gradient and coefficient gradient (float64), for every fused module, with
    fewer rows than output features (the backward adds the low-rank term) and more (it refolds)."""
    model, adapters, keys, coefficients, group_of, _, _ = setup(zoo, family, "layer_wise", "sigmoid")
    modules = attach(model, adapters, keys, coefficients, group_of).modules
    generator = torch.Generator().manual_seed(3)
    for module, rows in itertools.product(modules.values(), ("few", "many")):
        count = 5 if rows == "few" else module.base.out_features + 3
        x = torch.randn(count, module.base.in_features, dtype=torch.float64, generator=generator)
        results = []
        for forward in (module.folded_forward, module.factor_forward):
            coefficients.raw.grad = None
            rows = x.clone().requires_grad_()
            y = forward(rows, module.scaled_coefficients())
            y.sin().sum().backward()
            results.append((y.detach(), rows.grad, coefficients.raw.grad.clone()))
        (y, grad_x, grad_c), (y_ref, grad_x_ref, grad_c_ref) = results
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(grad_x, grad_x_ref, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(grad_c, grad_c_ref, atol=1e-12, rtol=1e-10)
        assert grad_c.abs().sum() > 0


def test_the_folded_path_is_taken_when_it_is_cheaper(zoo):
    model, adapters, keys, coefficients, group_of, _, _ = setup(zoo, "llama", "layer_wise", "sigmoid", torch.float32)
    module = attach(model, adapters, keys, coefficients, group_of).modules["model.layers.1.mlp.down_proj"]
    out_features, in_features = module.base.weight.shape
    enough = out_features * in_features // (in_features + out_features) + 1
    assert module.folds(torch.zeros(enough, in_features))
    assert not module.folds(torch.zeros(enough - 1, in_features))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not module.folds(torch.zeros(enough, in_features))


def test_factors_stored_in_half_under_autocast_change_nothing_and_are_not_copied(zoo):
    """Under autocast (bf16-mixed), factors stored in bf16 give the same output and coefficient
    gradient, bit for bit, as float32 factors that autocast casts at each call; and the backward keeps
    the stored factors themselves, where float32 ones leave a cast copy of each behind."""
    key = "model.layers.1.mlp.down_proj"
    # Its input requires grad, as inside a model: the backward then needs A_cat for the input gradient too.
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(1)).requires_grad_()
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        built = setup(zoo, "llama", "layer_wise", "sigmoid", torch.float32)
        model, adapters, keys, coefficients, group_of, _, _ = built
        module = attach(model, adapters, keys, coefficients, group_of, dtype=dtype).modules[key]
        saved = []

        def pack(tensor, saved=saved):
            saved.append((tuple(tensor.shape), tensor.data_ptr()))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = module(x)
            y.float().square().mean().backward()
        shapes = {shape for t in (module.A_cat, module.B_cat) for shape in (tuple(t.shape), tuple(t.shape)[::-1])}
        stored = {module.A_cat.data_ptr(), module.B_cat.data_ptr()}
        copies = [(shape, pointer) for shape, pointer in saved if shape in shapes and pointer not in stored]
        results[dtype] = (y, coefficients.raw.grad.clone(), copies)
    (y32, grad32, copies32), (y16, grad16, copies16) = results[torch.float32], results[torch.bfloat16]
    assert torch.equal(y16, y32) and torch.equal(grad16, grad32) and grad16.abs().sum() > 0
    assert len(copies32) == 2 and not copies16  # A_cat's and B_cat's casts, kept until the backward


@pytest.mark.parametrize(
    ("weight", "precision", "expected"),
    [
        (torch.bfloat16, "bf16-mixed", torch.bfloat16),
        (torch.float32, "bf16-mixed", torch.bfloat16),  # on CPU too: autocast runs the GEMMs in bf16
        (torch.float32, "16-mixed", torch.float16),
        (torch.bfloat16, "32-true", torch.float32),
        (torch.float64, "32-true", torch.float64),
    ],
)
def test_factor_dtype_follows_the_autocast_dtype(weight, precision, expected):
    assert factor_dtype(weight, precision) == expected


def test_scale_table_keeps_its_indices_together_under_a_default_device(zoo):
    """Lightning runs ``configure_model`` under ``torch.device(root_device)``: the table's tensors must
    stay on one device (they move together at the first fill), not follow the default device in part."""
    model, adapters, keys, coefficients, group_of, _, _ = setup(zoo, "llama", "layer_wise", "sigmoid", torch.float32)
    modules = list(attach(model, adapters, keys, coefficients, group_of).modules.values())
    with torch.device("meta"):
        table = ScaleTable(modules)
    assert {t.device.type for t in (table.group, table.adapter, table.scaling)} == {"cpu"}
    table.fill(coefficients)
    for module, chunk in zip(modules, table.chunks, strict=True):
        torch.testing.assert_close(chunk, module.scaled_coefficients(), atol=0, rtol=0)
