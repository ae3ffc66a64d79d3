"""Merge methods: registry, a battery over every method, exact numbers and parameter checks.

TIES follows peft and the TIES paper: the disjoint *mean* over the adapters that agree with the
elected sign, times lambda; peft's ``ties`` with every weight equal to lambda is the reference.
"""

from __future__ import annotations

import pkgutil
from typing import Any

import pytest
import torch
from conftest import peft_merge_utils

import lmerge.methods
from lmerge.errors import MethodError
from lmerge.methods import METHODS, Kind, MergeMethod, ModuleContext, _dare, get_method
from lmerge.methods._task_vectors import TaskVectors

KEY = "model.layers.3.self_attn.q_proj"
PEFT = peft_merge_utils()


def _ctx(method: MergeMethod, params: dict[str, Any], layer: int | None = 3) -> ModuleContext:
    """The context the runner builds with a scalar lambda policy."""
    lam = params[method.lambda_param] if method.lambda_param else None
    return ModuleContext(key=KEY, layer=layer, lam=lam)


def _deltas(n: int, out: int = 12, inp: int = 10, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(n, out, inp, generator=g) * (torch.rand(n, out, inp, generator=g) > 0.2)
    return deltas.to(dtype)


def _factors(n: int, rank: int = 4, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(rank, 10, generator=g) for _ in range(n)]
    Bs = [torch.randn(12, rank, generator=g) for _ in range(n)]
    return As, Bs


def _dense(method: MergeMethod, deltas: torch.Tensor, params: dict[str, Any], ctx: ModuleContext) -> torch.Tensor:
    """A dense method's merge of the stacked task vectors ``deltas`` [n, out, in]."""
    return method.fn(TaskVectors.from_dense(deltas), params, ctx)


def _merged_delta(method: MergeMethod, params: dict[str, Any], deltas: torch.Tensor, **factor_inputs):
    """Run ``method`` and return the merged dense delta, whatever its kind."""
    params = method.normalize_params(params, deltas.shape[0])
    ctx = _ctx(method, params)
    if method.kind in (Kind.FACTORS, Kind.LOW_RANK):
        A, B = method.fn(factor_inputs["As"], factor_inputs["Bs"], params, ctx)
        return B @ A
    if method.kind is Kind.LINEAR:
        coefficients = method.fn(deltas.shape[0], params, ctx)
        assert len(coefficients) == deltas.shape[0]
        return sum(c * d for c, d in zip(coefficients, deltas))
    return _dense(method, deltas, params, ctx)


# ---------------------------------------------------------------- registry


def test_every_method_file_registers_its_own_name_only():
    files = [
        m.name
        for m in pkgutil.iter_modules(lmerge.methods.__path__)
        if not m.name.startswith("_") and m.name != "registry"
    ]
    assert files
    by_module: dict[str, list[str]] = {}
    for name, method in METHODS.items():
        by_module.setdefault(method.fn.__module__, []).append(name)
    for file in files:
        assert by_module.get(f"lmerge.methods.{file}") == [file]


def test_descriptions_are_one_line():
    for method in METHODS.values():
        assert method.description and "\n" not in method.description


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(MethodError, match="unknown method 'nope'") as error:
        get_method("nope")
    for name in METHODS:
        assert name in str(error.value)


# ---------------------------------------------------------------- battery over every method


def _n_adapters(method: MergeMethod) -> int:
    return min(3, method.max_adapters or 3)


# Valid params for a merge of _n_adapters(method) different adapters; defaults otherwise.
BATTERY_PARAMS: dict[str, dict[str, Any]] = {
    "weighted": {"weights": [0.2, 0.3, 0.5]},
    "weighted_delta_n": {"weights": [0.2, 0.3, 0.5]},
    "weighted_rank": {"rank_weights": {KEY: [[0.2, 0.1, 0.0, 1.0], [0.3] * 4, [0.5] * 4]}},
}

# One adapter at weight 1 comes back unchanged.
IDENTITY_PARAMS: dict[str, dict[str, Any]] = {
    "uniform": {},
    "weighted": {"weights": [1.0]},
    "task_vector": {"lambda": 1.0},
    "uniform_delta": {},
    "uniform_scalar_delta": {"scale": 1.0},
    "weighted_delta_n": {"weights": [1.0]},
    "weighted_rank": {"rank_weights": {KEY: [[1.0] * 4]}},
    "ties": {"k": 100.0},
    "magnitude_prune": {"k": 100.0},
    "dare": {"drop_rate": 0.0},
    "dare_ties": {"drop_rate": 0.0},
    "tsv": {"keep": 1.0},
    "knots_ties": {"k": 100.0},
    "knots_dare": {"drop_rate": 0.0},
}
NO_IDENTITY = {
    "weighted_delta": "takes exactly two adapters",
    "iso_c": "flattens the spectrum",
    "iso_cts": "flattens the spectrum",
}
# Methods for which identical adapters are not a fixed point.
NO_FIXED_POINT = {
    "iso_c": "flattens the spectrum",
    "iso_cts": "flattens the spectrum",
}

# Identical adapters are a fixed point (three of them, two for weighted_delta).
FIXED_POINT_PARAMS: dict[str, dict[str, Any]] = {
    "tsv": {"keep": 1.0},  # the polar factors of n equal bases are partial isometries: their mean
    "knots_ties": {"k": 100.0},
    "knots_dare": {"drop_rate": 0.0},
    "uniform": {},
    "weighted": {"weights": [0.2, 0.3, 0.5]},
    "task_vector": {"lambda": 1 / 3},
    "uniform_delta": {},
    "uniform_scalar_delta": {"scale": 1 / 3},
    "weighted_delta": {"lambda": 0.3},
    "weighted_delta_n": {"weights": [2.0, 3.0, 5.0], "normalize_coefficients": True},
    "weighted_rank": {"rank_weights": {KEY: [[0.2] * 4, [0.3] * 4, [0.5] * 4]}},
    "ties": {"k": 100.0},
    "magnitude_prune": {"k": 100.0},
    "dare": {"drop_rate": 0.0},
    "dare_ties": {"drop_rate": 0.0},
}


def test_every_method_has_identity_and_fixed_point_cases():
    assert set(METHODS) == set(IDENTITY_PARAMS) | set(NO_IDENTITY)
    assert set(METHODS) == set(FIXED_POINT_PARAMS) | set(NO_FIXED_POINT)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_runs_deterministically_and_keeps_shape_without_nan(name):
    method = METHODS[name]
    n = _n_adapters(method)
    params = method.normalize_params(BATTERY_PARAMS.get(name, {}), n)
    ctx = _ctx(method, params)
    if method.kind is Kind.FACTORS:
        As, Bs = _factors(n)
        A, B = method.fn(As, Bs, params, ctx)
        A2, B2 = method.fn(As, Bs, params, ctx)
        # A LoRA of the module: the rank is the method's (the same, or the ranks' sum when exact).
        assert A.shape[1:] == As[0].shape[1:] and B.shape[0] == Bs[0].shape[0] and A.shape[0] == B.shape[1]
        assert torch.equal(A, A2) and torch.equal(B, B2)
        assert not (A.isnan().any() or B.isnan().any())
    elif method.kind is Kind.LOW_RANK:
        As, Bs = _factors(n)
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            factors = [A.to(dtype) for A in As], [B.to(dtype) for B in Bs]
            A, B = method.fn(*factors, params, ctx)
            A2, B2 = method.fn(*factors, params, ctx)
            assert A.shape[1] == As[0].shape[1] and B.shape[0] == Bs[0].shape[0]
            assert A.shape[0] == B.shape[1] <= sum(A_i.shape[0] for A_i in As)
            assert A.dtype == B.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert torch.equal(A, A2) and torch.equal(B, B2)
            assert not (A.isnan().any() or B.isnan().any())
    elif method.kind is Kind.LINEAR:
        coefficients = method.fn(n, params, ctx)
        assert coefficients == method.fn(n, params, ctx)
        assert len(coefficients) == n and all(isinstance(c, float) for c in coefficients)
        assert all(c == c for c in coefficients)
    else:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            deltas = _deltas(n, dtype=dtype)
            merged = _dense(method, deltas, params, ctx)
            assert merged.shape == deltas.shape[1:] and merged.dtype == dtype
            assert torch.equal(merged, _dense(method, deltas, params, ctx))
            assert not merged.isnan().any()


@pytest.mark.parametrize("name", sorted(IDENTITY_PARAMS))
def test_one_adapter_at_weight_one_is_unchanged(name):
    method = METHODS[name]
    deltas = _deltas(1)
    As, Bs = _factors(1)
    if method.kind is Kind.FACTORS:
        params = method.normalize_params(IDENTITY_PARAMS[name], 1)
        A, B = method.fn(As, Bs, params, _ctx(method, params))
        assert torch.equal(A, As[0]) and torch.equal(B, Bs[0])
    elif method.kind is Kind.LOW_RANK:  # exact up to the rounding of its QR and SVD
        torch.testing.assert_close(_merged_delta(method, IDENTITY_PARAMS[name], deltas, As=As, Bs=Bs), Bs[0] @ As[0])
    else:
        assert torch.equal(_merged_delta(method, IDENTITY_PARAMS[name], deltas), deltas[0])


@pytest.mark.parametrize("name", sorted(FIXED_POINT_PARAMS))
def test_identical_adapters_are_a_fixed_point(name):
    method = METHODS[name]
    n = _n_adapters(method)
    deltas = _deltas(1).expand(n, -1, -1).contiguous()
    As, Bs = _factors(1)
    merged = _merged_delta(method, FIXED_POINT_PARAMS[name], deltas, As=As * n, Bs=Bs * n)
    expected = Bs[0] @ As[0] if method.kind in (Kind.FACTORS, Kind.LOW_RANK) else deltas[0]
    torch.testing.assert_close(merged, expected)


# ---------------------------------------------------------------- exact numbers


@pytest.mark.parametrize("k", [0.0, 10.0, 37.5, 80.0])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_ties_matches_peft(k, lam):
    deltas = _deltas(3, 40, 50)
    params = get_method("ties").normalize_params({"k": k, "lambda": lam}, 3)
    merged = _dense(METHODS["ties"], deltas, params, _ctx(METHODS["ties"], params))
    expected = PEFT.ties(list(deltas), torch.full((3,), lam), density=k / 100, majority_sign_method="total")
    torch.testing.assert_close(merged, expected)


@pytest.mark.parametrize("k", [0.0, 10.0, 37.5, 80.0])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_magnitude_prune_matches_peft(k, lam):
    deltas = _deltas(3, 40, 50)
    method = get_method("magnitude_prune")
    params = method.normalize_params({"k": k, "lambda": lam}, 3)
    merged = _dense(method, deltas, params, _ctx(method, params))
    expected = PEFT.magnitude_prune(list(deltas), torch.full((3,), lam / 3), density=k / 100)
    torch.testing.assert_close(merged, expected)


def test_ties_at_k100_is_the_disjoint_mean_of_the_raw_deltas():
    deltas = torch.tensor([[[1.0, -2.0, 0.0]], [[3.0, 1.0, -1.0]]])
    method = get_method("ties")
    params = method.normalize_params({"k": 100.0, "lambda": 2.0}, 2)
    # Signs (+, -, -): means 2, -2, -1, times lambda 2.
    assert _dense(method, deltas, params, _ctx(method, params)).tolist() == [[4.0, -4.0, -2.0]]


@pytest.mark.parametrize("drop_rate", [0.0, 0.5, 0.9])
def test_dare_is_the_mean_of_the_dropped_and_rescaled_deltas(drop_rate):
    deltas = _deltas(3)
    method = get_method("dare")
    params = method.normalize_params({"drop_rate": drop_rate, "seed": 5, "lambda": 0.8}, 3)
    merged = _dense(method, deltas, params, _ctx(method, params))
    dropped = _dare.dare(deltas, drop_rate, 5, KEY)
    torch.testing.assert_close(merged, dropped.mean(dim=0) * 0.8)
    if drop_rate:
        other = ModuleContext(key=KEY.replace("q_proj", "k_proj"), layer=3, lam=0.8)
        assert not torch.equal(merged, _dense(method, deltas, params, other))


def test_dare_ties_is_peft_sign_election_and_disjoint_merge_of_the_dropped_deltas():
    deltas = _deltas(3)
    method = get_method("dare_ties")
    params = method.normalize_params({"drop_rate": 0.5, "seed": 5, "lambda": 0.8}, 3)
    merged = _dense(method, deltas, params, _ctx(method, params))
    dropped = _dare.dare(deltas, 0.5, 5, KEY)
    sign_mask = PEFT.calculate_majority_sign_mask(dropped, method="total")
    torch.testing.assert_close(merged, PEFT.disjoint_merge(dropped, sign_mask) * 0.8)


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.kind is Kind.DENSE))
def test_dense_methods_merge_factors_block_by_block_as_the_dense_stack(name):
    method = METHODS[name]
    params = method.normalize_params({}, 3)
    g = torch.Generator().manual_seed(9)
    As = [torch.randn(r, 70, generator=g) / 8 for r in (4, 4, 4)]
    Bs = [torch.randn(90, r, generator=g) for r in (4, 4, 4)]
    deltas = torch.stack([B @ A for A, B in zip(As, Bs)])
    expected = _dense(method, deltas, params, _ctx(method, params))
    # Any block size gives the same numbers: blocks are bitwise rows of the whole.
    for block_elements in (700, 5000):
        blocked = method.fn(TaskVectors.from_dense(deltas, block_elements), params, _ctx(method, params))
        assert torch.equal(blocked, expected)
    for ranks in ((4, 4, 4), (2, 4, 3)):
        factors = [A[:r] for A, r in zip(As, ranks)], [B[:, :r] for B, r in zip(Bs, ranks)]
        products = torch.stack([B @ A for A, B in zip(*factors)])
        merged = method.fn(TaskVectors.from_factors(*factors, block_elements=2000), params, _ctx(method, params))
        torch.testing.assert_close(merged, _dense(method, products, params, _ctx(method, params)))


def _coefficients(name: str, params: dict[str, Any], n: int, layer: int | None = 3, lam=None) -> list[float]:
    method = get_method(name)
    params = method.normalize_params(params, n)
    ctx = _ctx(method, params, layer)
    if lam is not None:
        ctx = ModuleContext(key=ctx.key, layer=ctx.layer, lam=lam)
    return method.fn(n, params, ctx)


def test_linear_rules_give_the_dense_formulas():
    d = _deltas(3)

    def combine(coefficients):
        return sum(c * x for c, x in zip(coefficients, d))

    torch.testing.assert_close(combine(_coefficients("task_vector", {"lambda": 0.4}, 3)), 0.4 * d.sum(0))
    torch.testing.assert_close(combine(_coefficients("uniform_delta", {}, 3)), d.mean(0))
    torch.testing.assert_close(combine(_coefficients("uniform_scalar_delta", {"scale": 1.5}, 3)), 1.5 * d.sum(0))
    torch.testing.assert_close(combine(_coefficients("weighted_delta", {"lambda": 0.3}, 2)), 0.3 * d[0] + 0.7 * d[1])
    w = [0.5, -1.0, 2.0]
    torch.testing.assert_close(
        combine(_coefficients("weighted_delta_n", {"weights": w, "allow_negative_coefficients": True}, 3)),
        0.5 * d[0] - d[1] + 2 * d[2],
    )


def test_the_policy_lambda_overrides_the_parameter():
    assert _coefficients("task_vector", {"lambda": 1.0}, 2, lam=0.25) == [0.25, 0.25]
    assert _coefficients("uniform_scalar_delta", {"scale": 1.0}, 2, lam=3.0) == [3.0, 3.0]
    assert _coefficients("weighted_delta", {"lambda": 0.5}, 2, lam=0.2) == [0.2, 0.8]
    method = get_method("task_vector")
    params = method.normalize_params({"lambda": 0.6}, 2)
    assert method.fn(2, params, ModuleContext(key=KEY, layer=3, lam=None)) == [0.6, 0.6]


def test_weighted_delta_n_layer_weights_and_normalization():
    params = {"weights": [1.0, 3.0], "layer_weights": {2: [0.0, 2.0]}, "normalize_coefficients": True}
    assert _coefficients("weighted_delta_n", params, 2, layer=2) == [0.0, 1.0]
    assert _coefficients("weighted_delta_n", params, 2, layer=5) == [0.25, 0.75]
    assert _coefficients("weighted_delta_n", params, 2, layer=None) == [0.25, 0.75]


def test_factor_methods_give_the_factor_formulas():
    As, Bs = _factors(2)
    uniform = get_method("uniform")
    A, B = uniform.fn(As, Bs, {}, _ctx(uniform, {}))
    torch.testing.assert_close(A, (As[0] + As[1]) / 2)
    torch.testing.assert_close(B, (Bs[0] + Bs[1]) / 2)
    weighted = get_method("weighted")
    params = weighted.normalize_params({"lambda": 0.3}, 2)
    A, B = weighted.fn(As, Bs, params, _ctx(weighted, params))
    torch.testing.assert_close(A, 0.3 * As[0] + 0.7 * As[1])
    torch.testing.assert_close(B, 0.3 * Bs[0] + 0.7 * Bs[1])


@pytest.mark.parametrize("name", ["uniform", "weighted"])
def test_factor_methods_reject_unequal_ranks(name):
    method = get_method(name)
    As, Bs = _factors(2)
    As[1], Bs[1] = As[1][:2], Bs[1][:, :2]
    params = method.normalize_params({}, 2)
    with pytest.raises(MethodError, match=KEY):
        method.fn(As, Bs, params, _ctx(method, params))


# ---------------------------------------------------------------- parameter checks


@pytest.mark.parametrize(
    ("name", "params", "n", "message"),
    [
        ("dare", {"drop_rate": 1.0}, 2, r"method_params\.drop_rate: must be in \[0, 1\), got 1"),
        ("dare", {"drop_rate": -0.1}, 2, r"method_params\.drop_rate"),
        ("dare_ties", {"drop_rate": 1.5}, 2, r"method_params\.drop_rate"),
        ("dare", {"seed": 1.5}, 2, r"method_params\.seed: expected an integer"),
        ("ties", {"k": 101}, 2, r"method_params\.k: must be in \[0, 100\], got 101"),
        ("magnitude_prune", {"k": -1}, 2, r"method_params\.k"),
        ("ties", {"k": "lots"}, 2, r"method_params\.k: expected float, got 'lots'"),
        ("ties", {"lambda": float("nan")}, 2, r"method_params\.lambda: expected a finite number"),
        ("weighted_delta", {"lambda": None}, 2, r"method_params\.lambda"),
        (
            "ties",
            {"density": 0.2},
            2,
            r"method_params\.density: not a parameter of method 'ties' \(valid: k, lambda, space\)",
        ),
        ("weighted_delta_n", {}, 2, r"method_params\.weights is required"),
        (
            "weighted_delta_n",
            {"weights": [0.5, 0.5]},
            3,
            r"method_params\.weights: has 2 values for 3 adapters",
        ),
        ("weighted_delta_n", {"weights": "[0.5, oops"}, 2, r"method_params\.weights: cannot parse"),
        ("weighted_delta_n", {"weights": "abc"}, 2, r"method_params\.weights: expected a list of 2 numbers"),
        ("weighted_delta_n", {"weights": [0.5, -0.5]}, 2, r"method_params\.weights: negative weight"),
        (
            "weighted_delta_n",
            {"weights": [1, 1], "layer_weights": {"4": [1, -1]}},
            2,
            r"method_params\.layer_weights\.4: negative weight",
        ),
        (
            "weighted_delta_n",
            {"weights": [1, 1], "layer_weights": {"four": [1, 1]}},
            2,
            r"method_params\.layer_weights: 'four' is not a layer index",
        ),
        (
            "weighted_delta_n",
            {"weights": [1, 1], "layer_weights": {2.5: [1, 1]}},
            2,
            r"method_params\.layer_weights: 2\.5 is not a layer index",
        ),
        (
            "weighted_delta_n",
            {"weights": [1, 1], "layer_weights": [1, 1]},
            2,
            r"method_params\.layer_weights",
        ),
        (
            "weighted_delta_n",
            {"weights": [1, -1], "allow_negative_coefficients": True, "normalize_coefficients": True},
            2,
            r"method_params\.weights: .* sum to 0",
        ),
        (
            "weighted_delta_n",
            {"weights": [1, 1], "normalize_coefficients": "maybe"},
            2,
            "normalize_coefficients",
        ),
        ("weighted", {}, 3, r"method_params\.weights is required with 3 adapters"),
        ("weighted", {"weights": [1.0]}, 2, r"method_params\.weights: has 1 values for 2 adapters"),
        ("weighted_delta", {}, 1, "needs at least 2 adapters, got 1"),
        ("weighted_delta", {}, 3, "takes at most 2 adapters, got 3"),
    ],
)
def test_bad_params_name_the_parameter(name, params, n, message):
    with pytest.raises(MethodError, match=message):
        get_method(name).normalize_params(params, n)


def test_negative_weights_are_allowed_when_asked():
    params = get_method("weighted_delta_n").normalize_params(
        {"weights": [0.5, -0.5], "allow_negative_coefficients": True}, 2
    )
    assert params["weights"] == [0.5, -0.5]


def test_command_line_strings_are_cast():
    assert get_method("ties").normalize_params({"k": "30", "lambda": "0.3"}, 2) == {
        "k": 30.0,
        "lambda": 0.3,
        "space": "weight",
    }
    assert get_method("dare").normalize_params({"seed": "7"}, 2)["seed"] == 7
    params = get_method("weighted_delta_n").normalize_params(
        {
            "weights": "[0.2, 0.8]",
            "layer_weights": "{0: [1, 0], '1': [-0.5, 1.5]}",
            "allow_negative_coefficients": "true",
        },
        2,
    )
    assert params["weights"] == [0.2, 0.8]
    assert params["layer_weights"] == {0: [1.0, 0.0], 1: [-0.5, 1.5]}
    assert params["allow_negative_coefficients"] is True
    assert get_method("weighted").normalize_params({"weights": "[1, 2, 3]"}, 3)["weights"] == [1.0, 2.0, 3.0]


def test_yaml_ints_become_floats():
    assert get_method("magnitude_prune").normalize_params({"k": 50, "lambda": 2}, 2) == {
        "k": 50.0,
        "lambda": 2.0,
        "space": "weight",
    }
