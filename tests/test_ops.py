"""Tensor math shared by the merge methods: task vectors in blocks, top-k, DARE, sign election,
disjoint mean."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from lmerge.methods import _cuts, _dare, _signs, _topk
from lmerge.methods._task_vectors import TaskVectors


def _reference_topk(x: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Sort-based top-k; a stable sort keeps tied entries in flat order, the rule topk_mask follows."""
    k = int(keep_fraction * x.numel())
    order = torch.sort(x.abs().reshape(-1).float(), descending=True, stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


def _factors(n: int, out: int, inp: int, ranks: list[int] | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or [4] * n
    As = [torch.randn(r, inp, generator=g) for r in ranks]
    Bs = [torch.randn(out, r, generator=g) for r in ranks]
    return As, Bs


def _blocks(deltas: TaskVectors) -> list[tuple[int, torch.Tensor]]:
    """``(start, block)`` of every block that ``merge`` hands out."""
    seen = []

    def record(block: torch.Tensor, start: int) -> torch.Tensor:
        seen.append((start, block.clone()))
        return block[0]

    deltas.merge(record)
    return seen


@pytest.mark.parametrize("shape", [(5, 7), (37, 29), (130, 64), (1000, 33)])
@pytest.mark.parametrize("block_elements", [64, 4096, 1 << 20])
def test_task_vector_blocks_cover_the_rows_in_order(shape, block_elements):
    out, inp = shape
    deltas = torch.randn(3, out, inp, generator=torch.Generator().manual_seed(0))
    blocks = _blocks(TaskVectors.from_dense(deltas, block_elements))
    rows = [block.shape[1] for _, block in blocks]
    assert [start for start, _ in blocks] == [sum(rows[:j]) * inp for j in range(len(rows))]
    assert torch.equal(torch.cat([block for _, block in blocks], dim=1), deltas)
    # Blocks start at whole vectors and never multiply fewer than 12 rows (bitwise the full product).
    assert all(start % 64 == 0 for start, _ in blocks)
    assert all(r >= min(12, out) for r in rows)


@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 8, 4]])
def test_task_vectors_from_factors_are_the_products(ranks):
    As, Bs = _factors(3, 70, 50, ranks)
    deltas = TaskVectors.from_factors(As, Bs, block_elements=2000)
    assert deltas.n == 3 and deltas.shape == (70, 50) and deltas.numel == 3500
    blocks = torch.cat([block for _, block in _blocks(deltas)], dim=1)
    torch.testing.assert_close(blocks, torch.stack([B @ A for A, B in zip(As, Bs)]))
    dense = torch.stack([B @ A for A, B in zip(As, Bs)])
    rows, cols = torch.meshgrid(torch.arange(70), torch.arange(50), indexing="ij")
    on_lattice = ((rows % 8 == cols % 8) & (rows < 64) & (cols < 48)).reshape(-1)  # whole multiples of 8
    expected = dense.reshape(3, -1)[:, on_lattice].sort(dim=1).values
    torch.testing.assert_close(deltas.lattice(8).sort(dim=1).values, expected)
    equal_ranks = TaskVectors.from_factors(As[:1] * 2, Bs[:1] * 2)
    torch.testing.assert_close(equal_ranks.lattice(8).sort(dim=1).values, expected[:1].expand(2, -1))
    assert torch.equal(TaskVectors.from_dense(dense).lattice(8).sort(dim=1).values, expected)
    assert TaskVectors.from_dense(dense[:, :5]).lattice(8).shape == (3, 5 * 50 // 5)  # e = 5 rows


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (64, 33), (300, 257)])
@pytest.mark.parametrize("keep", [0.0, 0.01, 0.2, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_mask_matches_sort_reference(shape, keep, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    mask = _topk.topk_mask(x, keep)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert int(mask.sum()) == int(keep * x.numel())
    assert torch.equal(mask, _reference_topk(x, keep))


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(10, 10),  # all tied at 0
        torch.tensor([3.0, -1.0, 2.0, -2.0, 2.0, 0.0, -2.0, 1.0]),  # ties at the threshold
        torch.cat([torch.tensor([1e30]), torch.rand(5000) * 1e-3]),  # one outlier: all else in one bin
        torch.tensor([1.0, float("inf"), -3.0, 0.5, float("-inf"), 2.0]),  # binning impossible
        torch.full((4, 4), 1e-44),  # denormal maximum
    ],
)
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75])
def test_topk_mask_edge_cases_keep_exactly_k(x, keep):
    assert torch.equal(_topk.topk_mask(x, keep), _reference_topk(x, keep))


@pytest.mark.parametrize("rows", [1024, 1100])  # one block, or sampled and scanned
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_mask_matches_torch_topk_on_a_big_tensor(rows, dtype):
    x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(1), dtype=dtype)
    before = x.clone()
    k = int(0.2 * x.numel())
    mask = _topk.topk_mask(x, 0.2)
    assert torch.equal(x, before)  # its sample is a copy, binned in place
    top = torch.topk(x.abs().reshape(-1), k).indices
    expected = torch.zeros(x.numel(), dtype=torch.bool)
    expected[top] = True
    assert torch.equal(mask.reshape(-1), expected)


@pytest.mark.parametrize("keep", [-0.1, 1.5])
def test_topk_mask_rejects_fractions_outside_unit_interval(keep):
    with pytest.raises(ValueError, match="keep_fraction"):
        _topk.topk_mask(torch.ones(3), keep)


def test_top_k_pruning_is_per_task_vector():
    # The second task vector is 1000x larger: a pooled top-k would keep none of the first.
    deltas = torch.randn(2, 20, 30, generator=torch.Generator().manual_seed(2))
    deltas[1] *= 1000
    for i, delta in enumerate(deltas):
        kept = _topk.merge_top_k(TaskVectors.from_dense(deltas), 0.1, lambda block, i=i: block[i])
        assert int((kept != 0).sum()) == int(0.1 * delta.numel())
        assert torch.equal(kept, delta * _reference_topk(delta, 0.1))


def _reference_pruned_sum(deltas: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    return (deltas * torch.stack([_reference_topk(delta, keep_fraction) for delta in deltas])).sum(dim=0)


@pytest.mark.parametrize("keep", [0.0, 0.05, 0.2, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_top_k_is_exactly_the_pruned_merge(keep, dtype):
    g = torch.Generator().manual_seed(5)
    deltas = (torch.randn(3, 150, 97, generator=g) * torch.rand(3, 150, 1, generator=g)).to(dtype)
    for block_elements in (512, 1 << 20):
        merged = _topk.merge_top_k(TaskVectors.from_dense(deltas, block_elements), keep, lambda b: b.sum(dim=0))
        assert torch.equal(merged, _reference_pruned_sum(deltas, keep))


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.7])
def test_merge_top_k_keeps_ties_in_flat_order_across_blocks(keep):
    # Few distinct magnitudes: the k-th largest is tied with thousands of entries in many blocks.
    g = torch.Generator().manual_seed(6)
    deltas = torch.randint(-4, 5, (2, 120, 80), generator=g).float()
    merged = _topk.merge_top_k(TaskVectors.from_dense(deltas, 640), keep, lambda b: b.sum(dim=0))
    assert torch.equal(merged, _reference_pruned_sum(deltas, keep))


def test_merge_top_k_with_fewer_nonzero_entries_than_k_keeps_them_all():
    deltas = torch.zeros(2, 40, 50)
    deltas[0, 3, :7] = torch.arange(1.0, 8.0)
    deltas[1, 10:20, 5] = -2.0
    merged = _topk.merge_top_k(TaskVectors.from_dense(deltas), 0.5, lambda b: b.sum(dim=0))
    assert torch.equal(merged, deltas.sum(dim=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_exact_cuts_keep_the_first_ties_in_flat_order(dtype):
    """The partition's cut against a stable sort: rows of few distinct magnitudes (ties on both
    sides of the k-th largest's place), a row of distinct ones and a row with fewer than k nonzero."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-3, 4, (5, 997), generator=g).to(dtype)
    x[3] = torch.randn(997, generator=g).to(dtype)
    x[4] = 0.0
    x[4, 5:9] = torch.tensor([1.0, -2.0, 2.0, 0.5])
    for k in (1, 50, 400, 996):
        for row, cut in zip(x, _cuts.exact_cuts(x, k), strict=True):
            magnitudes = _cuts.magnitudes(row)  # float64 stays float64: the cut's bounds are in it
            order = magnitudes.argsort(descending=True, stable=True)
            kept = torch.zeros(row.numel(), dtype=torch.bool)
            kept[order[:k]] = True
            positions = torch.arange(row.numel())
            by_cut = torch.where(positions < cut.index, magnitudes > cut.before, magnitudes > cut.after)
            if int((magnitudes > 0).sum()) < k:  # everything nonzero is kept, and zeros change no merge
                assert cut == _cuts.KEEP_ALL
                continue
            assert torch.equal(by_cut, kept), (k, cut)


def test_merge_top_k_stays_exact_when_the_sample_misses(monkeypatch):
    # A tiny sample and no margin: the brackets miss often, and the task vectors are scanned again.
    monkeypatch.setattr(_topk, "_SAMPLE_ALL", 0)
    monkeypatch.setattr(_topk, "_Z", 0.0)
    scans = []
    scan = _topk._scan
    monkeypatch.setattr(_topk, "_scan", lambda *args: scans.append(1) or scan(*args))
    g = torch.Generator().manual_seed(7)
    merges = 0
    for seed in range(5):
        deltas = torch.randn(4, 64, 50, generator=g) * (seed + 1)
        for keep in (0.1, 0.5, 0.9):
            merged = _topk.merge_top_k(TaskVectors.from_dense(deltas, 800), keep, lambda b: b.sum(dim=0))
            assert torch.equal(merged, _reference_pruned_sum(deltas, keep))
            merges += 1
    assert len(scans) > merges  # some merges did take the second scan


@pytest.mark.parametrize("values", ["normal", "few distinct"])
@pytest.mark.parametrize("keep", [0.03, 0.2, 0.6])
def test_merge_top_k_of_large_task_vectors_in_one_block(values, keep):
    """Cut by one histogram of the block (ties in flat order when few values occur)."""
    g = torch.Generator().manual_seed(8)
    if values == "normal":
        deltas = torch.randn(3, 256, 300, generator=g) * torch.rand(3, 256, 1, generator=g)
    else:
        deltas = torch.randint(-6, 7, (3, 256, 300), generator=g).float()
    merged = _topk.merge_top_k(TaskVectors.from_dense(deltas), keep, lambda b: b.sum(dim=0))
    assert torch.equal(merged, _reference_pruned_sum(deltas, keep))


def test_dare_is_deterministic_per_key_and_seed():
    deltas = torch.randn(3, 50, 40, generator=torch.Generator().manual_seed(3))
    first = _dare.dare(deltas, 0.5, 42, "layers.0.q_proj")
    assert torch.equal(first, _dare.dare(deltas, 0.5, 42, "layers.0.q_proj"))
    assert not torch.equal(first, _dare.dare(deltas, 0.5, 42, "layers.0.k_proj"))
    assert not torch.equal(first, _dare.dare(deltas, 0.5, 43, "layers.0.q_proj"))


def test_dare_masks_are_the_same_in_another_process():
    # Python's str hash is salted per process; the masks must not depend on it.
    code = "from lmerge.methods._dare import dare_mask; print(dare_mask((4, 16), 0.5, 7, 'a.b.3.q').int().tolist())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = _dare.dare_mask((4, 16), 0.5, 7, "a.b.3.q").int().tolist()
    assert out.stdout.strip() == str(here)


@pytest.mark.parametrize(
    ("shape", "drop_rate", "seed", "key", "digest", "kept"),
    [
        ((3, 40, 50), 0.37, 9, "model.layers.4.self_attn.o_proj", "b64775dbb734383a", 3769),
        ((2, 1000), 0.999, 0, "k", "a672312a54c7b0e1", 1),
        ((2, 1000), 0.001, 2**40 + 3, "k", "53ea7a4f53582203", 1998),
        ((5, 7), 0.5, 7, "a.b.3.q", "2398f6c32e4e8804", 10),
    ],
)
def test_dare_masks_are_those_of_earlier_versions(shape, drop_rate, seed, key, digest, kept):
    # Digests of the masks lmerge drew at 18e80e6: a DARE merge stays reproducible across versions.
    keep = _dare.dare_mask(shape, drop_rate, seed, key)
    assert int(keep.sum()) == kept
    assert hashlib.sha256(keep.numpy().tobytes()).hexdigest()[:16] == digest


def test_dare_drops_at_the_rate_and_rescales_the_rest():
    p = 0.9
    deltas = torch.randn(2, 400, 500, generator=torch.Generator().manual_seed(4)) + 10.0  # no zeros
    dropped = _dare.dare(deltas, p, 0, "model.layers.1.mlp.up_proj")
    kept = dropped != 0
    # 200k draws per task vector: the kept fraction is within 3 sigma (~0.002) of 1 - p.
    for row in kept:
        assert abs(row.float().mean().item() - (1 - p)) < 0.003
    assert not torch.equal(kept[0], kept[1])  # every task vector gets its own mask
    torch.testing.assert_close(dropped[kept], deltas[kept] / (1 - p))


def test_dare_with_zero_drop_rate_is_identity():
    deltas = torch.randn(2, 5, 6)
    assert torch.equal(_dare.dare(deltas, 0.0, 1, "k"), deltas)


def test_dare_keeps_dtype_and_device():
    deltas = torch.randn(2, 5, 6, dtype=torch.float64)
    out = _dare.dare(deltas, 0.3, 1, "k")
    assert out.dtype == torch.float64 and out.device == deltas.device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 18, 100, 5])
def test_dare_masks_applied_block_by_block_are_the_dense_masks(dtype, chunk, monkeypatch):
    # Hash bits drawn a chunk at a time (``_CHUNK`` entries, not a divisor of a block) or whole.
    monkeypatch.setattr(_dare, "_CHUNK", chunk)
    deltas = (torch.randn(3, 50, 37, generator=torch.Generator().manual_seed(8)) + 5).to(dtype)
    keep = _dare.dare_mask(deltas.shape, 0.7, 3, "layers.2.v_proj")
    mask = _dare.DareMask(0.7, 3, "layers.2.v_proj")
    for i in range(3):
        for block_elements in (100, 1 << 20):
            dropped = TaskVectors.from_dense(deltas, block_elements).merge(
                lambda block, start, i=i: mask.apply_(block, start)[i]
            )
            assert torch.equal(dropped, deltas[i] * keep[i])


@pytest.mark.parametrize("drop_rate", [0.1, 0.5, 0.9, 0.999])
def test_dare_masks_are_independent_draws(drop_rate):
    keep = _dare.dare_mask((4, 512, 512), drop_rate, 11, "model.layers.7.mlp.down_proj").float()
    n = keep[0].numel()
    for row in keep:
        assert abs(row.mean().item() - (1 - drop_rate)) < 5 * ((1 - drop_rate) * drop_rate / n) ** 0.5

    def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
        return float((a * b).mean() / (a.std() * b.std()))

    # Neighbours along a row and a column, and the same entry of another task vector.
    pairs = [(keep[:, :, :-1], keep[:, :, 1:]), (keep[:, :-1], keep[:, 1:]), (keep[:-1], keep[1:])]
    for a, b in pairs:
        assert abs(correlation(a, b)) < 5 / a.numel() ** 0.5


def test_elect_sign_and_disjoint_mean_by_hand():
    deltas = torch.tensor(
        [
            [1.0, -2.0, 0.0, 3.0, 2.0],
            [-1.0, -1.0, 0.0, -5.0, 4.0],
            [0.0, 4.0, 0.0, 1.0, -1.0],
        ]
    )
    sign = _signs.elect_sign(deltas)
    # Column sums 0, 1, 0, -1, 5: a zero sum elects +1.
    assert sign.tolist() == [1.0, 1.0, 1.0, -1.0, 1.0]
    # Only nonzero entries with the elected sign count; none at all gives 0.
    assert _signs.disjoint_mean_(deltas.clone()).tolist() == [1.0, 4.0, 0.0, -5.0, 3.0]
