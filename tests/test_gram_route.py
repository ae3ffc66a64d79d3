"""The Gram route to a factor stack's basis (lmerge.methods._bases) and its Householder fallback:
which stacks take which, and every low-rank merge's exactness on both, in float64 and float32."""

from __future__ import annotations

import math

import pytest
import torch
from test_lowrank import CASES, _method_and_params, _reference, merged_delta, relative_error

import lmerge.methods.iso_cts as iso_cts_module
import lmerge.methods.tsv as tsv_module
from lmerge.methods._bases import _STACK_BELOW, Basis, StackGram, basis_of, gram_matrices
from lmerge.methods._gram_product import gram_product_svd
from lmerge.methods._lowrank import concatenated_svd, small_svd, thin_svd
from lmerge.methods._polar import polar
from lmerge.methods._products import product_cores, product_svds

KEY = "model.layers.0.mlp.up_proj"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conditioned(m: int, R: int, kappa: float, seed: int) -> torch.Tensor:
    """A float64 [m, R] stack of singular values spread geometrically from 1 to 1 / kappa."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, R, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))[0]
    return (U * torch.logspace(0, -math.log10(kappa), R, dtype=torch.float64)) @ V.T


def factors(kappa: float, ranks=(4, 8, 6, 6), out=96, inp=64, seed=2) -> tuple[list, list]:
    """Adapters whose B stack and A stack both have condition number ``kappa``."""
    X, Y = conditioned(out, sum(ranks), kappa, seed), conditioned(inp, sum(ranks), kappa, seed + 1)
    ends = torch.tensor(ranks).cumsum(0).tolist()
    return [Y[:, e - r : e].T for r, e in zip(ranks, ends)], [X[:, e - r : e] for r, e in zip(ranks, ends)]


def matrix(basis: Basis) -> torch.Tensor:
    return basis.lift(torch.eye(basis.C.shape[0], dtype=basis.C.dtype))


@pytest.mark.parametrize(
    ("kappa", "dtype", "gram"),
    [
        (50, torch.float64, True),
        (300, torch.float64, False),
        (5, torch.float32, True),  # the float32 Gram
        (50, torch.float32, True),  # the float64 Gram of float32 factors
        (300, torch.float32, False),
    ],
)
def test_a_stack_gets_its_basis_from_its_gram_matrix_only_when_well_conditioned(kappa, dtype, gram):
    X = conditioned(200, 24, kappa, seed=1).to(dtype)
    basis = basis_of(X)
    assert (basis.T is not None) == gram == basis.singular
    Q = matrix(basis)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((Q.T @ Q - torch.eye(24, dtype=dtype)).abs().max()) < tolerance
    assert relative_error((Q @ basis.C).double(), X.double()) < tolerance
    if gram:  # its coordinates' rows are the stack's right singular vectors, scaled
        S = torch.linalg.svdvals(X.double())
        torch.testing.assert_close(basis.C.double().norm(dim=1), S, rtol=10 * tolerance, atol=0)


@pytest.mark.parametrize("stack", ["duplicate columns", "more columns than rows", "zeros", "one tiny column"])
def test_rank_deficient_or_badly_scaled_stacks_take_householder(stack):
    X = conditioned(30, 8, 2, seed=3)
    X = {
        "duplicate columns": torch.cat([X, X[:, :2]], dim=1),
        "more columns than rows": conditioned(40, 8, 2, seed=4).T,
        "zeros": torch.zeros_like(X),
        "one tiny column": torch.cat([X, 1e-5 * X[:, :1] + 1e-7], dim=1),
    }[stack]
    basis = basis_of(X)
    assert basis.T is None and not basis.singular
    torch.testing.assert_close(matrix(basis) @ basis.C, X)


def duplicated(kappa: float) -> tuple[list, list]:
    """Three adapters, the first twice: rank deficient stacks."""
    As, Bs = factors(kappa, ranks=(4, 6, 5))
    return [*As, As[0]], [*Bs, Bs[0]]


def scaled(kappa: float) -> tuple[list, list]:
    """One adapter a hundred thousand times smaller than the others: a badly conditioned stack."""
    As, Bs = factors(kappa)
    return As, [Bs[0] * 1e-5, *Bs[1:]]


INPUTS = {
    "well conditioned": lambda: factors(3),
    "at the Gram route's limit": lambda: factors(90),
    "past it": lambda: factors(1e4),
    "a duplicate adapter": lambda: duplicated(3),
    "one tiny adapter": lambda: scaled(3),
}


ILL_POSED = {"one tiny adapter": ("iso_cts",)}
ILL_POSED_WHY = "Iso-CTS with one adapter 1e5 times smaller differs by 1e-5 on the Householder route too"


@pytest.mark.filterwarnings("ignore:The density 1.0")
@pytest.mark.parametrize("inputs", sorted(INPUTS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_merge_stays_exact_on_both_routes(name, inputs):
    """Float64 factors, each method against its dense float64 reference: 1e-10 on either route."""
    if name in ILL_POSED.get(inputs, ()):
        pytest.skip(ILL_POSED_WHY)
    As, Bs = INPUTS[inputs]()
    deltas = torch.stack([B @ A for A, B in zip(As, Bs)])
    method, space = _method_and_params(name)
    for params in CASES[name]:
        reference = _reference(name, params, As, Bs, deltas, KEY)
        error = relative_error(merged_delta(method, As, Bs, {**params, **space}, KEY), reference)
        assert error < 1e-10, (params, error)


@pytest.mark.parametrize(
    ("inputs", "gram"), [("well conditioned", True), ("past it", False), ("a duplicate adapter", False)]
)
def test_iso_cts_takes_the_sum_s_gram_svd_only_when_it_exists(inputs, gram, monkeypatch):
    """Iso-CTS of a well-conditioned full-rank sum runs on the sum's SVD from Gram matrices; any
    other sum in core space (exactness on both: the test above)."""
    routes = []
    in_core_space = iso_cts_module._in_core_space
    monkeypatch.setattr(iso_cts_module, "_in_core_space", lambda *args: routes.append("core") or in_core_space(*args))
    As, Bs = INPUTS[inputs]()
    merged_delta("iso_cts", As, Bs, {}, KEY)
    assert routes == ([] if gram else ["core"])


# Methods whose result is continuous in the factors: a float32 rounding cannot flip a TIES sign
# election or a top-k membership and change an entry by its whole size.
CONTINUOUS = {"iso_c": {}, "iso_cts": {}, "tsv": {}, "dare:core": {"drop_rate": 0.0}, "knots_dare": {"drop_rate": 0.5}}


@pytest.mark.parametrize("kappa", [3, 30, 90, 150])
@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_float32_factors_match_the_float64_reference_within_float32_rounding(name, kappa):
    """Float32 factors (Gram in float32 up to kappa 10, in float64 up to 100, Householder past it)
    against the float64 reference of the same numbers: the Householder route's own error is up to
    2e-5 here. (Much worse conditioned stacks make a sum whose smallest singular values fall under
    float32's rank tolerance, where Iso-C's rank, and so its result, is float32's own.)"""
    As, Bs = factors(kappa)
    As32, Bs32 = [A.float() for A in As], [B.float() for B in Bs]
    As, Bs = [A.double() for A in As32], [B.double() for B in Bs32]
    deltas = torch.stack([B @ A for A, B in zip(As, Bs)])
    method, space = _method_and_params(name)
    params = CONTINUOUS[name]
    reference = _reference(name, params, As, Bs, deltas, KEY)
    merged = merged_delta(method, As32, Bs32, {**params, **space}, KEY)
    assert merged.dtype == torch.float32
    assert relative_error(merged.double(), reference) < 5e-5


@pytest.mark.parametrize("kappa", [3, 90, 1e4])
def test_concatenated_svd_of_float32_factors(kappa):
    """KnOTS's joint SVD from float32 factors: each task vector rebuilt as U (S V_i^T), and the
    shared singular values those of the float64 concatenation."""
    As, Bs = factors(kappa)
    As32, Bs32 = [A.float() for A in As], [B.float() for B in Bs]
    svd = concatenated_svd(As32, Bs32)
    tasks = [svd.SV.merge(lambda block, start, i=i: block[i]) for i in range(len(As))]
    for A, B, task in zip(As32, Bs32, tasks):
        A_, B_ = svd.lift(task)
        assert relative_error((B_ @ A_).double(), (B @ A).double()) < 2e-5
    deltas = torch.cat([(B @ A).double() for A, B in zip(As32, Bs32)], dim=1)
    S = torch.linalg.svdvals(deltas)[: tasks[0].shape[0]]
    torch.testing.assert_close(torch.cat(tasks, dim=1).double().norm(dim=1), S, rtol=2e-5, atol=1e-6 * float(S[0]))


@pytest.mark.parametrize("pair", ["well conditioned", "rank deficient B", "badly scaled A"])
def test_product_svd_on_both_routes(pair):
    """The SVD of B @ A from the factors' Gram matrices, or from thin QRs when one factor is rank
    deficient or badly conditioned: the same singular values and an exact, orthonormal SVD."""
    g = torch.Generator().manual_seed(6)
    # Long enough factors for the Gram route (32 rows per unit of rank).
    B, A = torch.randn(200, 5, generator=g, dtype=torch.float64), torch.randn(5, 180, generator=g, dtype=torch.float64)
    if pair == "rank deficient B":
        B[:, 4] = B[:, 0]
    if pair == "badly scaled A":
        A[2] *= 1e-6
    (svd,) = product_svds([B], [A])
    assert (svd.Fb is B) == (pair == "well conditioned")
    rank = 4 if pair == "rank deficient B" else 5
    U, Vh = svd.U(rank), svd.Vh(rank)
    S = torch.linalg.svdvals(B @ A)[:rank]  # itself accurate to eps * S[0]
    torch.testing.assert_close(svd.S[:rank], S, rtol=1e-12, atol=1e-13 * float(S[0]))
    torch.testing.assert_close(U @ torch.diag(svd.S[:rank]) @ Vh, B @ A)
    torch.testing.assert_close(U.T @ U, torch.eye(rank, dtype=torch.float64))
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(rank, dtype=torch.float64))


@pytest.mark.parametrize(
    ("inputs", "dtype", "tolerance"),
    [
        ("well conditioned", torch.float64, 1e-12),
        ("well conditioned", torch.float32, 1e-5),
        ("badly conditioned product", torch.float64, None),
        ("rank deficient", torch.float64, None),
        ("more rank than columns", torch.float64, None),
    ],
)
def test_product_svd_from_gram_matrices_or_none(inputs, dtype, tolerance):
    """Iso-C's and Iso-CTS's route for a well-conditioned sum: U diag(S) (Qa V)^T is the SVD of
    B @ A, U = B left(I) is orthonormal with U^T B its stack coordinates, and B K A is the polar
    factor; anything it cannot do as exactly as a Gram basis is declined (None)."""
    As, Bs = {
        "well conditioned": lambda: factors(3),
        "badly conditioned product": lambda: factors(30),
        "rank deficient": lambda: duplicated(3),
        "more rank than columns": lambda: ([torch.randn(40, 64) for _ in "AB"], [torch.randn(96, 40) for _ in "AB"]),
    }[inputs]()
    B, A = torch.cat(Bs, dim=1).to(dtype), torch.cat(As, dim=0).to(dtype)
    svd = gram_product_svd(B, A)
    if tolerance is None:
        assert svd is None
        return
    U_ref, S_ref, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    R = A.shape[0]
    torch.testing.assert_close(svd.S.double(), S_ref[:R], rtol=tolerance, atol=0)
    assert relative_error((B @ svd.polar().to(dtype) @ A).double(), U_ref[:, :R] @ Vh[:R]) < tolerance
    eye = torch.eye(R, dtype=svd.S.dtype)
    U = (B @ svd.left(eye).to(dtype)).double()
    assert float((U.T @ U - torch.eye(R, dtype=torch.float64)).abs().max()) < 10 * tolerance
    assert relative_error(svd.stack_coordinates().double(), U.T @ B.double()) < 10 * tolerance
    rebuilt = B @ svd.right(svd.left(svd.S[:, None] * svd.V.T)).to(dtype) @ A
    assert relative_error(rebuilt.double(), B.double() @ A.double()) < tolerance


@pytest.mark.parametrize(
    ("kappa", "dtype", "tolerance"),
    [(5, torch.float32, 1e-5), (30, torch.float32, 1e-5), (50, torch.float64, 1e-12), (300, torch.float64, 1e-12)],
)
def test_small_svd_from_the_gram_matrix_or_lapack(kappa, dtype, tolerance, monkeypatch):
    """A core's SVD, from its Gram matrix when well conditioned for the first tier (kappa 10 in
    float32, 100 in float64) and from LAPACK otherwise: exact and orthonormal either way."""
    x = conditioned(40, 40, kappa, seed=7).to(dtype)
    lapack = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *args, **kwargs: lapack.append(1) or svd(*args, **kwargs))
    P, S, Wh = small_svd(x)
    assert bool(lapack) == (kappa > (10 if dtype == torch.float32 else 100))
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(x.double()), rtol=tolerance, atol=0)
    assert relative_error(((P * S) @ Wh).double(), x.double()) < tolerance
    eye = torch.eye(40, dtype=dtype)
    assert float((P.T @ P - eye).abs().max()) < 10 * tolerance
    assert float((Wh @ Wh.T - eye).abs().max()) < 10 * tolerance


def test_a_float32_svd_that_fails_to_converge_is_done_in_float64(monkeypatch):
    """MKL's float32 divide-and-conquer SVD fails on some finite matrices with clustered singular
    values (Iso-CTS met one at n = 32: a nearly orthonormal stack before its polar factor): the
    float64 SVD takes over, and the result is the float32 rounding of it."""
    x = conditioned(30, 30, 3, seed=8).float()
    svd = torch.linalg.svd

    def float32_fails(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", float32_fails)
    P, S, Wh = thin_svd(x)
    assert P.dtype == S.dtype == Wh.dtype == torch.float32
    assert relative_error(((P * S) @ Wh).double(), x.double()) < 1e-6
    Q = polar(x)
    torch.testing.assert_close(Q.T @ Q, torch.eye(30), atol=1e-5, rtol=0)
    with pytest.raises(torch.linalg.LinAlgError):  # a float64 failure, or non-finite input, stays one
        thin_svd(torch.full((3, 3), math.nan))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kappa", [3, 30, 90])
def test_tsv_keeping_every_direction_takes_no_per_task_svd(kappa, dtype):
    """Factors long enough for the Gram route, each task keeping all its directions: TSV from the
    tasks' bases and cores alone (``tsv._every_direction``), against the dense reference of the
    same numbers, directly and through the method."""
    As, Bs = factors(kappa, ranks=(2, 3, 2, 3), out=160, inp=128, seed=5)
    As, Bs = [A.to(dtype) for A in As], [B.to(dtype) for B in Bs]
    deltas = torch.stack([B.double() @ A.double() for A, B in zip(As, Bs)])
    reference = _reference("tsv", {"lambda": 0.7}, [A.double() for A in As], [B.double() for B in Bs], deltas, KEY)
    tolerance = 1e-10 if dtype == torch.float64 else 5e-5
    merged = tsv_module._every_direction(Bs, As, 0.7)
    assert merged is not None
    assert relative_error((merged[1] @ merged[0]).double(), reference) < tolerance
    method, _ = _method_and_params("tsv")
    assert relative_error(merged_delta(method, As, Bs, {"lambda": 0.7}, KEY).double(), reference) < tolerance


def test_a_product_is_certain_of_full_rank_only_when_its_bases_say_so():
    """``product_cores``' certificate: the product's smallest singular value is at least its
    bases' smallest ones multiplied, against the rank tolerance at its largest. Float32 factors of
    condition 90 each over 1100 rows pass the Gram route, but 1 / 90^2 is under 1100 * eps32:
    no certainty, so TSV takes the tasks' SVDs (where the rank is decided); condition 3 is certain."""
    for kappa, certain in ((3, True), (90, False)):
        B = conditioned(1100, 2, kappa, seed=1).float()
        A = conditioned(1100, 2, kappa, seed=2).T.float()
        assert product_cores([B], [A]).full_rank is certain
        other_B, other_A = conditioned(1100, 2, 3, seed=3).float(), conditioned(1100, 2, 3, seed=4).T.float()
        merged = tsv_module._every_direction([B, other_B], [A, other_A], 1.0)
        assert (merged is not None) is certain


@pytest.mark.parametrize("rows", [64, _STACK_BELOW // 4 + 5])  # stacked, and a GEMM each
@pytest.mark.parametrize("transposed", [False, True])
def test_gram_matrices_of_a_list_are_each_matrix_s_own(rows, transposed):
    g = torch.Generator().manual_seed(rows)
    factors = [torch.randn(4, rows, generator=g) for _ in range(3)] if transposed else None
    matrices = [f.T for f in factors] if transposed else [torch.randn(rows, 4, generator=g) for _ in range(3)]
    expected = torch.stack([m.double().T @ m.double() for m in matrices])
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        grams = gram_matrices(matrices, dtype)
        assert grams.dtype == dtype and grams.shape == (3, 4, 4)
        assert float((grams.double() - expected).norm() / expected.norm()) < tolerance


@pytest.mark.parametrize("side", ["B", "A"])
def test_a_stack_s_gram_matrix_gives_its_parts_their_own(side):
    """StackGram: the stack's Gram matrix once per precision, and each part's (an adapter's
    factor, of mixed ranks) as its diagonal block, or in a wider precision from the part itself."""
    g = torch.Generator().manual_seed(5)
    if side == "B":
        parts = [torch.randn(300, r, generator=g) for r in (4, 8, 4)]
        X = torch.cat(parts, dim=1)
    else:  # [A_1; ...; A_n]^T and each A_i^T: transposed views, as TSV passes them
        As = [torch.randn(r, 300, generator=g) for r in (4, 8, 4)]
        X, parts = torch.cat(As, dim=0).T, [A.T for A in As]
    grams = StackGram(X, parts)
    assert grams(torch.float32) is grams(torch.float32)  # computed once
    for members in ([0, 2], [1]):
        expected = torch.stack([parts[i].double().T @ parts[i].double() for i in members])
        for dtype, tolerance in ((torch.float32, 1e-6), (torch.float64, 1e-14)):
            blocks = grams.of(members)(dtype)
            assert blocks.dtype == dtype
            assert float((blocks.double() - expected).norm() / expected.norm()) < tolerance
