"""Exact low-rank methods (tsv, iso_c, iso_cts, knots_ties, knots_dare) and dense methods in core
space: each against a dense float64 reference written here from the full ``out x in`` task
vectors (PEFT's own deltas) with ``torch.linalg.svd``, the paper's algorithm step by step; their
properties; and the whole path through ``run_merge`` and plain PEFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import peft_merge_utils
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lmerge.adapters import LoraAdapter
from lmerge.adapters.align import align_keys
from lmerge.errors import MethodError
from lmerge.layers import layer_index
from lmerge.merge.engine import COMBINERS
from lmerge.methods import METHODS, Kind, ModuleContext, _dare, get_method
from lmerge.methods._bases import Basis
from lmerge.methods._lowrank import CoreSpace, _nonzero
from lmerge.methods._polar import polar, polar_rows_extending
from lmerge.methods._products import product_svds
from lmerge.methods._scratch import release, scratch

EPS = torch.finfo(torch.float64).eps
LOW_RANK = sorted(name for name, method in METHODS.items() if method.kind is Kind.LOW_RANK)
DENSE = sorted(name for name, method in METHODS.items() if method.kind is Kind.DENSE)
FAMILIES = {
    # Unequal ranks (4, 2, 4 or 2, 3), rslora (bert_c), rank_pattern (bert_d), alpha_pattern (bert_e).
    "bert": ("bert", ("bert_a", "bert_c", "bert_d", "bert_e")),
    # Ranks 4, 8 and 6 (2 on o_proj), rslora and alpha_pattern (llama_d).
    "llama": ("llama", ("llama_a", "llama_b", "llama_d")),
}


PEFT = peft_merge_utils()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: more intra-op threads would only add their synchronisation (much of it on a
    loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- dense float64 references


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(x, full_matrices=False)


def rank_of(S: torch.Tensor, shape: tuple[int, ...], largest: torch.Tensor | None = None) -> int:
    """Singular values above max(shape) * eps * the largest (numpy's matrix_rank rule)."""
    largest = S[0] if largest is None else largest
    return int((S > max(shape) * EPS * largest).sum())


def orthogonalized(x: torch.Tensor) -> torch.Tensor:
    """The authors' orthogonalization, u @ v of the thin SVD, over x's numerical rank (the
    partial isometry of a rank-deficient x, whose other singular vectors are arbitrary)."""
    u, S, vh = svd(x)
    rank = rank_of(S, x.shape)
    return u[:, :rank] @ vh[:rank]


def tsv_reference(deltas, ranks, keep: float | None, lam: float) -> torch.Tensor:
    """TSV-M: per task SVD, top int(min(out, in) / n) (the authors' count; with ``keep``,
    int(keep * r_i)) triplets, at least 1, concatenate, orthogonalize U and V."""
    Us, Ss, Vhs = [], [], []
    for delta, rank in zip(deltas, ranks, strict=True):
        U, S, Vh = svd(delta)
        wanted = int(min(delta.shape) * (1 / len(deltas))) if keep is None else int(keep * rank)
        kept = min(max(1, wanted), rank_of(S, delta.shape))
        Us.append(U[:, :kept])
        Ss.append(S[:kept])
        Vhs.append(Vh[:kept])
    U_perp, V_perp = orthogonalized(torch.cat(Us, 1)), orthogonalized(torch.cat(Vhs, 0))
    return lam * U_perp @ torch.diag(torch.cat(Ss)) @ V_perp


def iso_c_reference(deltas, lam: float) -> torch.Tensor:
    """Iso-C: SVD of the sum, its nonzero singular values replaced by their mean."""
    U, S, Vh = svd(sum(deltas))
    rank = rank_of(S, deltas[0].shape)
    return lam * S[:rank].mean() * U[:, :rank] @ Vh[:rank]


def iso_cts_reference(deltas, common: float, lam: float) -> torch.Tensor:
    """Iso-CTS: common directions of the sum, each task's top directions off them, orthogonalized,
    flat spectrum (the authors' iso_cts with the sum's rank in place of min(out, in))."""
    n = len(deltas)
    U, S, Vh = svd(sum(deltas))
    rank = rank_of(S, deltas[0].shape)
    c = int(rank * common)
    per_task = min(round((rank - c) / n), rank // n)
    c = rank - n * per_task
    Uc = U[:, :c]
    Us, Ss, Vhs = [Uc], [S[:c]], [Vh[:c]]
    for delta in deltas:
        u, s, vh = svd(delta - Uc @ Uc.T @ delta)
        kept = min(per_task, rank_of(s, delta.shape, largest=S[0]))
        Us.append(u[:, :kept])
        Ss.append(s[:kept])
        Vhs.append(vh[:kept])
    flat = torch.cat(Ss).mean()
    return lam * flat * orthogonalized(torch.cat(Us, 1)) @ orthogonalized(torch.cat(Vhs, 0))


def knots_components(deltas) -> tuple[torch.Tensor, torch.Tensor]:
    """U and the per-task S V_i^T of the SVD of the task vectors side by side ([out, n in]),
    its components of nonzero singular value (the authors drop s <= 1e-5)."""
    concatenated = torch.cat(list(deltas), dim=1)
    U, S, Vh = svd(concatenated)
    kept = rank_of(S, concatenated.shape)
    inp = deltas[0].shape[1]
    SV = torch.stack([S[:kept, None] * Vh[:kept, i * inp : (i + 1) * inp] for i in range(len(deltas))])
    return U[:, :kept], SV


def knots_ties_reference(deltas, k: float, lam: float) -> torch.Tensor:
    U, SV = knots_components(deltas)
    return U @ PEFT.ties(
        list(SV), torch.full((len(SV),), lam, dtype=torch.float64), density=k / 100, majority_sign_method="total"
    )


def knots_dare_reference(deltas, drop_rate: float, seed: int, key: str, lam: float) -> torch.Tensor:
    U, SV = knots_components(deltas)
    dropped = _dare.dare(SV, drop_rate, seed, key)
    return lam * U @ PEFT.disjoint_merge(dropped, PEFT.calculate_majority_sign_mask(dropped, method="total"))


DENSE_REFERENCES = {
    # Each on stacked task vectors (or cores) [n, a, b], params as normalized.
    "ties": lambda d, p, key: PEFT.ties(
        list(d),
        torch.full((len(d),), p["lambda"], dtype=torch.float64),
        density=p["k"] / 100,
        majority_sign_method="total",
    ),
    "magnitude_prune": lambda d, p, key: PEFT.magnitude_prune(
        list(d), torch.full((len(d),), p["lambda"] / len(d), dtype=torch.float64), density=p["k"] / 100
    ),
    "dare": lambda d, p, key: p["lambda"] * _dare.dare(d, p["drop_rate"], p["seed"], key).mean(0),
    "dare_ties": lambda d, p, key: (
        p["lambda"]
        * PEFT.disjoint_merge(
            dropped := _dare.dare(d, p["drop_rate"], p["seed"], key),
            PEFT.calculate_majority_sign_mask(dropped, method="total"),
        )
    ),
}


def core_space_reference(name: str, deltas, As, Bs, params, key) -> torch.Tensor:
    """Core Space merging: U, V the singular vectors of the factor stacks, the dense method on the
    cores U^T delta_i V, then U M V^T."""
    U, Sb, _ = svd(torch.cat(Bs, dim=1))
    _, Sa, Vh = svd(torch.cat(As, dim=0))
    # The singular vectors of nonzero singular values (numpy's rank rule).
    U, V = U[:, : max(1, _numerical_rank(Sb, torch.cat(Bs, dim=1)))], Vh[: max(1, _numerical_rank(Sa, torch.cat(As)))].T
    cores = torch.stack([U.T @ delta @ V for delta in deltas])
    return U @ DENSE_REFERENCES[name](cores, params, key) @ V.T


def _numerical_rank(S: torch.Tensor, x: torch.Tensor) -> int:
    return int((S > S[0] * max(x.shape) * torch.finfo(x.dtype).eps).sum())


def low_rank_reference(name: str, deltas, ranks, params, key) -> torch.Tensor:
    lam = params["lambda"]
    references = {
        "tsv": lambda: tsv_reference(deltas, ranks, params["keep"], lam),
        "iso_c": lambda: iso_c_reference(deltas, lam),
        "iso_cts": lambda: iso_cts_reference(deltas, params["common"], lam),
        "knots_ties": lambda: knots_ties_reference(deltas, params["k"], lam),
        "knots_dare": lambda: knots_dare_reference(deltas, params["drop_rate"], params["seed"], key, lam),
    }
    return references[name]()


def _method_and_params(name: str) -> tuple[str, dict[str, Any]]:
    method, _, space = name.partition(":")
    return method, ({"space": space} if space else {})


def _reference(name: str, params: dict[str, Any], As, Bs, deltas, key: str) -> torch.Tensor:
    method, space_params = _method_and_params(name)
    normalized = get_method(method).normalize_params({**params, **space_params}, len(As))
    if space_params:
        return core_space_reference(method, deltas, As, Bs, normalized, key)
    return low_rank_reference(method, deltas, [A.shape[0] for A in As], normalized, key)


# ---------------------------------------------------------------- inputs


def relative_error(merged: torch.Tensor, reference: torch.Tensor) -> float:
    return float((merged - reference).norm() / reference.norm())


def peft_deltas(zoo, base: str, name: str) -> dict[str, torch.Tensor]:
    """PEFT's own float64 delta weight of every LoRA module of adapter ``name``, by lmerge key."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if base == "llama" else AutoModelForSequenceClassification
    model = PeftModel.from_pretrained(auto.from_pretrained(zoo[base]), zoo[name]).double()
    return {
        module_name.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
        for module_name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


@pytest.fixture(scope="module")
def families(zoo) -> dict[str, dict[str, Any]]:
    """Per family: the adapters, the common keys, float64 factors (scaling in B) and PEFT's deltas."""
    out = {}
    for family, (base, names) in FAMILIES.items():
        adapters = [LoraAdapter(zoo[name]) for name in names]
        keys, _ = align_keys(adapters, "common")
        references = [peft_deltas(zoo, base, name) for name in names]
        modules = {}
        for key in keys:
            As, Bs, deltas = [], [], []
            for adapter, reference in zip(adapters, references, strict=True):
                A, B = adapter.factors(key)
                As.append(A.double())
                Bs.append(B.double() * adapter.scaling(key))
                deltas.append(reference[key])
            modules[key] = (As, Bs, torch.stack(deltas))
        out[family] = {"names": names, "modules": modules}
    return out


def merged_delta(name: str, As, Bs, params: dict[str, Any], key: str, lam: float | None = None) -> torch.Tensor:
    """The method's merge of one module through the engine's combiner, as a dense update."""
    method = get_method(name)
    params = method.normalize_params(params, len(As))
    ctx = ModuleContext(key=key, layer=layer_index(key), lam=params[method.lambda_param] if lam is None else lam)
    module = COMBINERS[method.kind](method, As, Bs, params, ctx)
    assert module.delta is None and module.A.shape[0] <= sum(A.shape[0] for A in As)
    return module.B @ module.A


# ---------------------------------------------------------------- exactness against the references

CASES = {
    "tsv": [{}, {"keep": 0.5, "lambda": 0.7}, {"keep": 1.0}],
    "iso_c": [{}, {"lambda": 1.7}],
    "iso_cts": [{}, {"common": 0.5, "lambda": 1.3}, {"common": 1.0}],
    "knots_ties": [{}, {"k": 60, "lambda": 0.8}, {"k": 100}],
    "knots_dare": [{}, {"drop_rate": 0.3, "seed": 3, "lambda": 1.5}],
    "ties:core": [{}, {"k": 55, "lambda": 0.6}],
    "magnitude_prune:core": [{}, {"k": 70}],
    "dare:core": [{}, {"drop_rate": 0.4, "seed": 9}],
    "dare_ties:core": [{}, {"drop_rate": 0.5}],
}
"""Parameters per method (``<dense method>:core`` in core space), each checked on every module."""


def test_every_low_rank_method_and_dense_method_in_core_space_has_cases():
    assert set(CASES) == set(LOW_RANK) | {f"{name}:core" for name in DENSE}
    for name in DENSE:
        assert METHODS[name].defaults["space"] == "weight"


@pytest.mark.filterwarnings("ignore:The density 1.0")  # the k = 100 case, in PEFT's reference ties
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_merge_matches_its_dense_reference(families, family, name):
    method, space = _method_and_params(name)
    for params in CASES[name]:
        for key, (As, Bs, deltas) in families[family]["modules"].items():
            reference = _reference(name, params, As, Bs, deltas, key)
            error = relative_error(merged_delta(method, As, Bs, {**params, **space}, key), reference)
            assert error < 1e-10, (key, params, error)


def _random_factors(ranks, out, inp, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, inp, generator=g, dtype=dtype) for r in ranks]
    Bs = [torch.randn(out, r, generator=g, dtype=dtype) for r in ranks]
    return As, Bs


@pytest.mark.parametrize("shape", [(9, 40), (40, 7), (6, 6), (40, 3)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_more_rank_than_rows_or_columns(name, shape):
    """sum r_i above out or in: bases of min(dim, R) columns, results of rank <= R still exact
    (with in = 3 below every r_i, KnOTS's concatenation has rank 9 < min(out, R) = 12)."""
    method, params = _method_and_params(name)
    As, Bs = _random_factors((4, 5, 3), *shape, seed=1)
    deltas = torch.stack([B @ A for A, B in zip(As, Bs)])
    key = "model.layers.1.mlp.up_proj"
    reference = _reference(name, {}, As, Bs, deltas, key)
    assert relative_error(merged_delta(method, As, Bs, params, key), reference) < 1e-10


@pytest.mark.filterwarnings("ignore:The density 1.0")
@pytest.mark.parametrize("name", sorted(CASES))
def test_seeded_random_shapes_and_ranks_match_the_reference(name):
    """Random module shapes, adapter counts, unequal ranks (some above out or in) and scales,
    each with a random one of the method's parameter cases, against the dense reference."""
    import random

    method, space = _method_and_params(name)
    rng = random.Random(f"lowrank-{name}")
    for case in range(25):
        n = rng.choice([1, 2, 3, 5])
        out, inp = rng.choice([3, 8, 17, 40]), rng.choice([3, 9, 24, 50])
        ranks = [rng.choice([1, 2, 4, 8]) for _ in range(n)]
        As, Bs = _random_factors(ranks, out, inp, seed=case)
        Bs = [B * 10.0 ** rng.uniform(-1.5, 1.5) for B in Bs]
        deltas = torch.stack([B @ A for A, B in zip(As, Bs)])
        params = rng.choice(CASES[name])
        key = "model.layers.1.mlp.up_proj"
        reference = _reference(name, params, As, Bs, deltas, key)
        merged = merged_delta(method, As, Bs, {**params, **space}, key)
        # A one-entry core that DARE drops merges to zero: then the merge must be zero too.
        error = relative_error(merged, reference) if reference.any() else float(merged.norm())
        assert error < 1e-9, (case, n, out, inp, ranks, params, error)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ["knots_ties", "knots_dare"])
def test_knots_of_an_all_zero_adapter_is_the_merge_without_it(name):
    """Its zero columns leave the concatenation's rank as it was, so they add no component (whose
    zero rows would add entries to TIES's top-k count), and its own S V_i^T is zero."""
    As, Bs = _random_factors((4, 6, 4), 30, 20, seed=2)
    key = "model.layers.1.mlp.up_proj"
    params = {"drop_rate": 0.0} if name == "knots_dare" else {}
    without = merged_delta(name, As[1:], Bs[1:], params, key)
    with_zero = merged_delta(name, As, [torch.zeros_like(Bs[0]), *Bs[1:]], params, key)
    assert relative_error(with_zero, without) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_iso_of_task_vectors_that_cancel_is_zero(name, dtype):
    """Of a + (-a) the sum's rounding noise is not taken for directions (its rank tolerance is at
    the tasks' scale), so that Iso-CTS has no task-specific directions to add either; with a third
    adapter b, the merge is b's alone (Iso-CTS with every direction common: no task-specific ones)."""
    As, Bs = _random_factors((4, 6), 300, 200, seed=3, dtype=dtype)
    key = "model.layers.1.mlp.up_proj"
    params = {"common": 1.0} if name == "iso_cts" else {}
    assert not merged_delta(name, [As[0], As[0]], [Bs[0], -Bs[0]], params, key).any()
    merged = merged_delta(name, [As[0], As[0], As[1]], [Bs[0], -Bs[0], Bs[1]], params, key)
    assert relative_error(merged, merged_delta(name, As[1:], Bs[1:], params, key)) < 1e-4


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare"])
def test_core_space_merge_ignores_an_all_zero_adapter_and_a_duplicate_of_one(name):
    """As in weight space, an adapter of a zero update adds nothing, and an adapter merged with
    itself is its own merge: the zero adapter's factors are left out of the stacks (PEFT's
    initial A would turn every core), and so are the stacks' singular vectors of zero singular
    value, which would add rows and columns of zeros to every core and so entries to a top-k
    count (of a duplicate, its k% would keep 4k% of the adapter's core). The zero adapter comes
    last, so that DARE draws the same masks for the others (whose mean it then takes over one
    more adapter, as in weight space)."""
    As, Bs = _random_factors((4, 6, 3), 30, 20, seed=2)
    key = "model.layers.1.mlp.up_proj"
    params = {"space": "core", **({"drop_rate": 0.3} if name.startswith("dare") else {})}
    without = merged_delta(name, As[:2], Bs[:2], params, key) * (2 / 3 if name == "dare" else 1)
    # Both factors zero, or only B (PEFT's initialization: A is random).
    for zero_A in (torch.zeros_like(As[2]), As[2]):
        with_zero = merged_delta(name, [*As[:2], zero_A], [*Bs[:2], torch.zeros_like(Bs[2])], params, key)
        assert relative_error(with_zero, without) < 1e-12
    if name == "ties":
        twice = merged_delta(name, As[:1] * 2, Bs[:1] * 2, params, key)
        assert relative_error(twice, merged_delta(name, As[:1], Bs[:1], params, key)) < 1e-10


@pytest.mark.parametrize("name", ["iso_c", "iso_cts", "tsv"])
def test_an_untrained_adapter_changes_no_svd_merge(name):
    """PEFT's initial adapter (B = 0, A random) has no directions: the sum, each task's SVD and
    Iso-CTS's share of task-specific directions per task are those of the others."""
    As, Bs = _random_factors((4, 6, 3), 30, 20, seed=5)
    key = "model.layers.1.mlp.up_proj"
    with_untrained = merged_delta(name, As, [*Bs[:2], torch.zeros_like(Bs[2])], {}, key)
    assert relative_error(with_untrained, merged_delta(name, As[:2], Bs[:2], {}, key)) < 1e-12


def test_product_svd_is_the_svd_of_the_product():
    As, Bs = _random_factors((5,), 30, 20)
    (svd_of,) = product_svds([Bs[0]], [As[0]])
    U, S, Vh = svd(Bs[0] @ As[0])
    torch.testing.assert_close(svd_of.S, S[:5], rtol=1e-12, atol=0)
    torch.testing.assert_close(svd_of.U(5) @ torch.diag(svd_of.S) @ svd_of.Vh(5), Bs[0] @ As[0])
    torch.testing.assert_close(svd_of.U(5).T @ svd_of.U(5), torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close((svd_of.U(5).T @ U[:, :5]).abs(), torch.eye(5, dtype=torch.float64))


def test_batched_product_svds_keep_each_pair_and_its_place():
    """Mixed shapes go through one batched QR/SVD per shape; each result is its own pair's SVD."""
    As, Bs = _random_factors((3, 5, 3, 2, 5), 30, 20, seed=11)
    svds = product_svds(Bs, As)
    for A, B, svd_of in zip(As, Bs, svds, strict=True):
        r = A.shape[0]
        torch.testing.assert_close(svd_of.U(r) @ torch.diag(svd_of.S) @ svd_of.Vh(r), B @ A)
        torch.testing.assert_close(svd_of.S, svd(B @ A)[1][:r])


def basis_matrix(basis: Basis) -> torch.Tensor:
    """The basis ``Q`` itself, ``F T``, formed for a check."""
    return basis.lift(torch.eye(basis.C.shape[0], dtype=basis.C.dtype))


@pytest.mark.parametrize("shape", [(60, 30), (30, 60), (40, 40)])
def test_a_lift_as_wide_as_a_basis_keeps_the_basis_and_multiplies_once(shape):
    """The result B' A' is exact either way; a full-width core goes into the factor on the smaller
    of out and in, the other factor is the basis's tall factor itself (one GEMM instead of two)."""
    As, Bs = _random_factors((3, 4), *shape, seed=12)
    space = CoreSpace(As, Bs)
    Qb, Qa = basis_matrix(space.column), basis_matrix(space.row)
    left, right = torch.randn(2, 7, 7, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    A, B = space.lift(left, right)
    torch.testing.assert_close(B @ A, Qb @ left @ right @ Qa.T)
    kept_b = B is space.column.F
    kept_a = A.data_ptr() == space.row.F.data_ptr()
    assert kept_b == (shape[0] >= shape[1]) and kept_a == (shape[0] < shape[1])
    # A narrower result keeps its rank: two GEMMs.
    A, B = space.lift(left[:, :2], right[:2])
    assert A.shape[0] == 2
    torch.testing.assert_close(B @ A, Qb @ left[:, :2] @ right[:2] @ Qa.T)


def test_scratch_buffers_are_reused_and_never_shared():
    release()  # this thread's pool holds what earlier merges gave back
    with scratch(1000, torch.float32) as first, scratch(1000, torch.float32) as second:
        assert first.data_ptr() != second.data_ptr()
        pointers = {first.data_ptr(), second.data_ptr()}
    with scratch(600, torch.float32) as again, scratch(10, torch.int32) as other:
        assert again.data_ptr() in pointers and again.numel() == 600 and other.dtype == torch.int32


def test_polar_factor_is_orthonormal_and_nearest():
    g = torch.Generator().manual_seed(2)
    for shape in ((30, 6), (6, 30), (7, 7)):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        p = polar(x)
        small = min(shape)
        gram = p.T @ p if shape[0] >= shape[1] else p @ p.T
        torch.testing.assert_close(gram, torch.eye(small, dtype=torch.float64))
        torch.testing.assert_close(p, orthogonalized(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("common", "extra", "width"), [(20, 6, 26), (20, 6, 40), (3, 8, 30), (0, 4, 9)])
def test_polar_of_orthonormal_rows_extended_by_more_is_the_svd_one(common, extra, width, dtype):
    """Iso-CTS's right directions: orthonormal rows, then rows leaning on them, whose polar factor
    comes from a small eigendecomposition; the same as the SVD's, float32 within its rounding."""
    g = torch.Generator().manual_seed(common + extra + width)
    basis = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))[0].T
    C = basis[:common]
    T = (
        0.5 * torch.randn(extra, common, generator=g, dtype=torch.float64) @ C
        + torch.randn(extra, width - common, generator=g, dtype=torch.float64)
        @ basis[common:]
        / (width - common) ** 0.5
    )
    reference = polar(torch.cat([C, T]).T).T
    rows = polar_rows_extending(C.to(dtype), T.to(dtype))
    assert rows is not None and rows.dtype == dtype
    assert relative_error(rows.double(), reference) < (1e-12 if dtype == torch.float64 else 2e-6)


def test_polar_of_extended_rows_declines_dependent_rows():
    """A task row inside the common rows' span (the polar factor is then a partial isometry, the
    SVD's to compute) and no rows at all both leave the polar factor to :func:`polar`."""
    basis = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    C = basis.T[:5]
    assert polar_rows_extending(C, 0.3 * C[:1] + 0.7 * C[1:2]) is None
    assert polar_rows_extending(C, C[:0]) is None


def test_a_factor_is_zero_only_when_every_entry_is():
    """Core space leaves out adapters of a zero factor, found from the factors' norms: a float32
    norm that underflows to zero, or a NaN one, is looked at entry by entry."""
    tiny = torch.full((4, 5), 1e-30)
    assert float(torch._foreach_norm([tiny])[0]) == 0.0
    factors = [torch.zeros(3, 2), tiny, torch.ones(2), torch.tensor([float("nan"), 0.0]), torch.zeros(0)]
    assert _nonzero(factors) == [False, True, True, True, False]


def test_core_space_is_exact_and_a_linear_merge_in_it_is_the_weight_space_one():
    As, Bs = _random_factors((3, 5, 2), 50, 40, seed=3)
    space = CoreSpace(As, Bs)
    Pb, Pa = space.singular_bases()
    U = basis_matrix(space.column) @ (torch.eye(10, dtype=torch.float64) if Pb is None else Pb)
    V = basis_matrix(space.row) @ (torch.eye(10, dtype=torch.float64) if Pa is None else Pa)
    cores = space.cores(Pb, Pa)
    cores = torch.stack([cores.merge(lambda block, start, i=i: block[i]) for i in range(len(As))])
    for core, A, B in zip(cores, As, Bs):
        torch.testing.assert_close(U @ core @ V.T, B @ A)
    torch.testing.assert_close(U.abs(), svd(torch.cat(Bs, 1))[0].abs())
    torch.testing.assert_close(V.abs(), svd(torch.cat(As, 0))[2].T.abs())
    c = [0.3, -1.2, 2.0]
    merged = sum(ci * core for ci, core in zip(c, cores))
    A, B = space.lift_core(merged, Pb, Pa)
    weight_space = sum(ci * B_i @ A_i for ci, A_i, B_i in zip(c, As, Bs))
    assert relative_error(B @ A, weight_space) < 1e-13


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_core_space_linear_merges_equal_task_vector(families, family):
    for key, (As, Bs, _) in families[family]["modules"].items():
        n = len(As)
        task_vector = merged_delta("task_vector", As, Bs, {"lambda": 0.8}, key)
        for name, params in (("dare", {"drop_rate": 0.0}), ("magnitude_prune", {"k": 100})):
            core = merged_delta(name, As, Bs, {**params, "space": "core", "lambda": 0.8 * n}, key)
            assert relative_error(core, task_vector) < 1e-12


def test_iso_c_spectrum_is_flat_on_its_rank():
    As, Bs = _random_factors((4, 6, 3), 40, 30, seed=4)
    merged = merged_delta("iso_c", As, Bs, {"lambda": 2.0}, "x")
    S = torch.linalg.svdvals(merged)
    total = torch.linalg.svdvals(sum(B @ A for A, B in zip(As, Bs)))
    torch.testing.assert_close(S[:13], torch.full((13,), 2.0 * float(total[:13].mean()), dtype=torch.float64))
    assert float(S[13:].max()) < 1e-12 * float(S[0])
    # iso_cts's spectrum is flat too.
    S = torch.linalg.svdvals(merged_delta("iso_cts", As, Bs, {}, "x"))
    assert float(S[:13].max() - S[:13].min()) < 1e-12 * float(S[0])


def test_tsv_of_orthogonal_task_vectors_with_keep_1_is_their_sum():
    g = torch.Generator().manual_seed(5)
    ranks = (3, 4, 2)
    U, _ = torch.linalg.qr(torch.randn(60, 9, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(50, 9, generator=g, dtype=torch.float64))
    As, Bs, start = [], [], 0
    for r in ranks:
        mix = torch.randn(r, r, generator=g, dtype=torch.float64)
        Bs.append(U[:, start : start + r] @ mix)
        As.append(torch.randn(r, r, generator=g, dtype=torch.float64) @ V[:, start : start + r].T)
        start += r
    total = sum(B @ A for A, B in zip(As, Bs))
    assert relative_error(merged_delta("tsv", As, Bs, {"keep": 1.0}, "x"), total) < 1e-12
    # The default, the authors' int(min(out, in) / n) = 16 of each, keeps every direction too.
    assert relative_error(merged_delta("tsv", As, Bs, {}, "x"), total) < 1e-12
    # int(r_i / 3), at least 1, of each: a different, smaller merge.
    assert relative_error(merged_delta("tsv", As, Bs, {"keep": 1 / 3}, "x"), total) > 0.1


def test_policy_lambda_scales_every_low_rank_result():
    As, Bs = _random_factors((2, 3), 20, 16, seed=6)
    for name in LOW_RANK:
        one = merged_delta(name, As, Bs, {}, "x", lam=1.0)
        torch.testing.assert_close(merged_delta(name, As, Bs, {}, "x", lam=0.25), 0.25 * one)


def test_zero_task_vectors_merge_to_a_zero_rank_one_lora():
    As, Bs = _random_factors((2, 3), 20, 16, seed=7)
    Bs = [torch.zeros_like(B) for B in Bs]
    for name in LOW_RANK:
        method = get_method(name)
        params = method.normalize_params({}, 2)
        A, B = method.fn(As, Bs, params, ModuleContext(key="x", layer=None, lam=1.0))
        assert A.shape[0] >= 1 and not (B @ A).any()


@pytest.mark.parametrize("a_scale, b_scale", [(1.0, 2.0**64), (1.0, 2.0**-84), (2.0**-70, 2.0**50)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_factors_far_from_unit_scale_merge_as_at_unit_scale(name, a_scale, b_scale):
    """Finite float32 factors whose squares overflow (an eigendecomposition would stop) or
    underflow (a Gram matrix rounded to zero merged Iso-CTS wrong): the engine brings them to
    unit scale by powers of two and scales the merge back, so it is the unit-scale merge scaled."""
    method, params = _method_and_params(name)
    As, Bs = _random_factors((4, 5, 3), 40, 30, seed=3, dtype=torch.float32)
    key = "model.layers.1.mlp.up_proj"
    at_unit = merged_delta(method, [A.clone() for A in As], [B.clone() for B in Bs], params, key)
    scaled = merged_delta(method, [A * a_scale for A in As], [B * b_scale for B in Bs], params, key)
    assert relative_error(scaled.double() / (a_scale * b_scale), at_unit.double()) < 1e-6


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_out_by_in_tensor_is_ever_allocated(name):
    """Every tensor any operation makes while merging a 4096 x 4096 module stays far below
    out x in elements (the largest are the factor stacks and a dense method's cache-sized blocks)."""
    method, params = _method_and_params(name)
    out = inp = 4096
    As, Bs = _random_factors((2, 3, 1), out, inp, seed=8, dtype=torch.float32)
    m = get_method(method)
    normalized = m.normalize_params(params, 3)
    ctx = ModuleContext(key="model.layers.0.mlp.up_proj", layer=0, lam=1.0)
    with LargestTensor() as largest:
        module = COMBINERS[m.kind](m, As, Bs, normalized, ctx)
    assert module.delta is None and module.A.shape[0] <= 6
    assert largest.numel < out * inp // 8, largest.numel


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("tsv", {"keep": 0}, r"method_params\.keep: must be in \(0, 1\], got 0"),
        ("tsv", {"keep": 1.5}, r"method_params\.keep: must be in \(0, 1\]"),
        ("tsv", {"keep": "half"}, r"method_params\.keep: expected a finite number, got 'half'"),
        ("iso_c", {"lambda": "x"}, r"method_params\.lambda: expected float, got 'x'"),
        ("iso_cts", {"common": 1.2}, r"method_params\.common: must be in \[0, 1\], got 1\.2"),
        ("knots_ties", {"k": -5}, r"method_params\.k: must be in \[0, 100\]"),
        ("knots_dare", {"drop_rate": 1.0}, r"method_params\.drop_rate: must be in \[0, 1\)"),
        ("knots_dare", {"seed": 0.5}, r"method_params\.seed: expected an integer"),
        ("ties", {"space": "svd"}, r"method_params\.space: must be one of weight, core, got 'svd'"),
        ("iso_c", {"space": "core"}, r"method_params\.space: not a parameter of method 'iso_c'"),
    ],
)
def test_bad_params_name_the_parameter(name, params, message):
    with pytest.raises(MethodError, match=message):
        get_method(name).normalize_params(params, 2)


def test_command_line_strings_are_cast():
    assert get_method("tsv").normalize_params({"keep": "0.5", "lambda": "2"}, 3) == {"keep": 0.5, "lambda": 2.0}
    assert get_method("tsv").normalize_params({}, 3)["keep"] is None
    assert get_method("ties").normalize_params({"space": "core"}, 2)["space"] == "core"
    assert get_method("knots_dare").normalize_params({"seed": "7"}, 2)["seed"] == 7


# ---------------------------------------------------------------- through run_merge and plain PEFT

SAVED = LOW_RANK + ["ties:core", "dare:core"]


def _saved_deltas(zoo, family: str, run_dir: Path) -> dict[str, torch.Tensor]:
    """The merged adapter's delta per module as plain PEFT loads it (float64)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if family == "llama" else AutoModelForSequenceClassification
    model = PeftModel.from_pretrained(auto.from_pretrained(zoo[family]), run_dir).double()
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", SAVED)
def test_saved_merge_is_exact_and_reloads_through_peft(zoo, families, tmp_path, family, name):
    from lmerge.merge.config import MergeConfig
    from lmerge.pipeline import run_merge

    method, params = _method_and_params(name)
    adapters = [str(zoo[n]) for n in families[family]["names"]]
    result = run_merge(MergeConfig(adapters=adapters, method=method, method_params=params, output_dir=str(tmp_path)))
    save = result.metadata["save"]
    assert save["relative_error_max"] == 0.0 and "svd_relative_error" not in save
    saved = LoraAdapter(result.run_dir)
    assert save["rank"] == max(shape.rank for shape in saved.shapes.values())
    loaded = _saved_deltas(zoo, family, result.run_dir)
    assert set(loaded) == set(families[family]["modules"])
    for key, (As, Bs, deltas) in families[family]["modules"].items():
        assert saved.shapes[key].rank <= sum(A.shape[0] for A in As)
        # Merged in float32 from the files through QR and SVD, saved in float32: float32 precision.
        assert relative_error(loaded[key], _reference(name, {}, As, Bs, deltas, key)) < 1e-4


def test_adapters_far_from_unit_scale_merge_through_the_command_line(zoo, families, tmp_path):
    """Finite float32 adapters whose B's squares overflow float32 (Iso-CTS stopped with a LAPACK
    error) or underflow it (its merge was wrong, without a word): merged as at unit scale."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lmerge.__main__ import main

    def merged(scale: float) -> LoraAdapter:
        copies = []
        for name in families["llama"]["names"]:
            copy = tmp_path / f"{name}_{scale:g}"
            shutil.copytree(zoo[name], copy)
            weights = copy / "adapter_model.safetensors"
            tensors = load_file(str(weights))
            save_file({k: t * scale if ".lora_B." in k else t for k, t in tensors.items()}, str(weights))
            copies.append(str(copy))
        out = tmp_path / f"out_{scale:g}"
        args = ["merge", "--adapters", f"[{','.join(copies)}]", "--method", "iso_cts", "--output_dir", str(out)]
        assert main(args) == 0
        return LoraAdapter(next(out.rglob("adapter_config.json")).parent)

    unit = merged(1.0)
    for scale in (2.0**64, 2.0**-84):
        far = merged(scale)
        for key in unit.module_keys:
            A, B = far.factors(key)
            A1, B1 = unit.factors(key)
            assert relative_error((B.double() @ A.double()) / scale, B1.double() @ A1.double()) < 1e-6


@pytest.mark.parametrize("name", ["iso_cts", "knots_ties", "tsv", "ties:core"])
def test_per_layer_lambda_and_transforms_apply(zoo, families, tmp_path, name):
    from lmerge.merge.config import MergeConfig
    from lmerge.pipeline import run_merge

    method, params = _method_and_params(name)
    names = families["llama"]["names"]
    result = run_merge(
        MergeConfig(
            adapters=[str(zoo[n]) for n in names],
            method=method,
            method_params=params,
            lambda_policy={"type": "per_layer", "default": 0.9, "overrides": {0: 0.3}},
            transforms=[{"name": "layer_l2_normalize", "params": {"target_norm": 2.0}}],
            output_dir=str(tmp_path),
        )
    )
    loaded = _saved_deltas(zoo, "llama", result.run_dir)
    modules = families["llama"]["modules"]
    for key, (As, Bs, deltas) in modules.items():
        layer = layer_index(key)
        # Each adapter's task vectors in each layer scaled to Frobenius norm 2 over the layer.
        norms = [
            sum(float(d[i].square().sum()) for k, (_, _, d) in modules.items() if layer_index(k) == layer) ** 0.5
            for i in range(len(As))
        ]
        scales = [2.0 / norm for norm in norms]
        scaled_Bs = [B * s for B, s in zip(Bs, scales)]
        scaled = torch.stack([d * s for d, s in zip(deltas, scales)])
        reference = _reference(name, {"lambda": 0.3 if layer == 0 else 0.9}, As, scaled_Bs, scaled, key)
        assert relative_error(loaded[key], reference) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tsv", "ties:core"])
def test_full_save_matches_the_lora_save(zoo, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmerge.merge.config import MergeConfig, SaveConfig
    from lmerge.pipeline import run_merge

    method, params = _method_and_params(name)
    adapters = [str(zoo[n]) for n in FAMILIES["llama"][1]]
    runs = {
        fmt: run_merge(
            MergeConfig(
                adapters=adapters,
                method=method,
                method_params=params,
                save=SaveConfig(format=fmt),
                output_dir=str(tmp_path),
            )
        )
        for fmt in ("full", "lora")
    }
    ids = torch.arange(12).reshape(2, 6) % 128 + 1
    full = AutoModelForCausalLM.from_pretrained(runs["full"].run_dir).eval()
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama"]), runs["lora"].run_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_grid_and_bayes_sweeps_over_space_lambda_and_keep(tasks, tmp_path):
    from lmerge.sweep import SweepConfig, run_sweep

    def sweep(method: str, search: dict[str, Any]):
        config = SweepConfig(
            adapters=["alpha", "beta"], catalog=str(tasks), method=method, output_dir=str(tmp_path), search=search
        )
        return run_sweep(config)

    grid = sweep("ties", {"type": "grid", "grid": {"space": ["weight", "core"]}})
    assert sorted(p["params"]["space"] for p in grid.points) == ["core", "weight"]
    space = {
        "space": {"type": "categorical", "choices": ["weight", "core"]},
        "k": {"type": "float", "min": 10, "max": 90},
    }
    # Three points, the third proposed by the Gaussian process over the categorical space.
    bayes = sweep("ties", {"type": "bayes", "budget": 3, "init_points": 2, "seed": 3, "space": space})
    assert len(bayes.points) == 3 and {p["params"]["space"] for p in bayes.points} <= {"weight", "core"}
    assert len({p["tag"] for p in bayes.points}) == 3
    tsv_space = {"keep": {"type": "float", "min": 0.25, "max": 1.0}, "lambda": {"type": "float", "min": 0.5, "max": 2}}
    tuned = sweep("tsv", {"type": "bayes", "budget": 2, "init_points": 2, "space": tsv_space})
    assert len(tuned.points) == 2 and all(0.25 <= p["params"]["keep"] <= 1.0 for p in tuned.points)
