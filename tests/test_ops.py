"""Tensor math shared by the merge methods: top-k masks, DARE, sign election, disjoint mean."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lmerge.methods import _ops


def _reference_topk(x: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Sort-based top-k; a stable sort keeps tied entries in flat order, the rule topk_mask follows."""
    k = int(keep_fraction * x.numel())
    order = torch.sort(x.abs().reshape(-1).float(), descending=True, stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (64, 33), (300, 257)])
@pytest.mark.parametrize("keep", [0.0, 0.01, 0.2, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_mask_matches_sort_reference(shape, keep, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    mask = _ops.topk_mask(x, keep)
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
    assert torch.equal(_ops.topk_mask(x, keep), _reference_topk(x, keep))


def test_topk_mask_matches_torch_topk_on_a_big_tensor():
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1))
    k = int(0.2 * x.numel())
    mask = _ops.topk_mask(x, 0.2)
    top = torch.topk(x.abs().reshape(-1), k).indices
    expected = torch.zeros(x.numel(), dtype=torch.bool)
    expected[top] = True
    assert torch.equal(mask.reshape(-1), expected)


@pytest.mark.parametrize("keep", [-0.1, 1.5])
def test_topk_mask_rejects_fractions_outside_unit_interval(keep):
    with pytest.raises(ValueError, match="keep_fraction"):
        _ops.topk_mask(torch.ones(3), keep)


def test_prune_magnitude_is_per_task_vector():
    # The second task vector is 1000x larger: a pooled top-k would keep none of the first.
    deltas = torch.randn(2, 20, 30, generator=torch.Generator().manual_seed(2))
    deltas[1] *= 1000
    pruned = _ops.prune_magnitude(deltas, 0.1)
    for delta, kept in zip(deltas, pruned):
        mask = _reference_topk(delta, 0.1)
        assert int((kept != 0).sum()) == int(0.1 * delta.numel())
        assert torch.equal(kept, delta * mask)


def test_dare_is_deterministic_per_key_and_seed():
    deltas = torch.randn(3, 50, 40, generator=torch.Generator().manual_seed(3))
    first = _ops.dare(deltas, 0.5, 42, "layers.0.q_proj")
    assert torch.equal(first, _ops.dare(deltas, 0.5, 42, "layers.0.q_proj"))
    assert not torch.equal(first, _ops.dare(deltas, 0.5, 42, "layers.0.k_proj"))
    assert not torch.equal(first, _ops.dare(deltas, 0.5, 43, "layers.0.q_proj"))


def test_dare_masks_are_the_same_in_another_process():
    # Python's str hash is salted per process; the masks must not depend on it.
    code = (
        "from lmerge.methods._ops import dare_generator, dare_mask; "
        "print(dare_mask((64,), 0.5, dare_generator(7, 'a.b.3.q')).int().tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = _ops.dare_mask((64,), 0.5, _ops.dare_generator(7, "a.b.3.q")).int().tolist()
    assert out.stdout.strip() == str(here)


def test_dare_drops_at_the_rate_and_rescales_the_rest():
    p = 0.9
    deltas = torch.randn(2, 400, 500, generator=torch.Generator().manual_seed(4)) + 10.0  # no zeros
    dropped = _ops.dare(deltas, p, 0, "model.layers.1.mlp.up_proj")
    kept = dropped != 0
    # 200k draws per task vector: the kept fraction is within 3 sigma (~0.002) of 1 - p.
    for row in kept:
        assert abs(row.float().mean().item() - (1 - p)) < 0.003
    assert not torch.equal(kept[0], kept[1])  # every task vector gets its own mask
    torch.testing.assert_close(dropped[kept], deltas[kept] / (1 - p))


def test_dare_with_zero_drop_rate_is_identity():
    deltas = torch.randn(2, 5, 6)
    assert torch.equal(_ops.dare(deltas, 0.0, 1, "k"), deltas)


def test_dare_keeps_dtype_and_device():
    deltas = torch.randn(2, 5, 6, dtype=torch.float64)
    out = _ops.dare(deltas, 0.3, 1, "k")
    assert out.dtype == torch.float64 and out.device == deltas.device


def test_elect_sign_and_disjoint_mean_by_hand():
    deltas = torch.tensor(
        [
            [1.0, -2.0, 0.0, 3.0, 2.0],
            [-1.0, -1.0, 0.0, -5.0, 4.0],
            [0.0, 4.0, 0.0, 1.0, -1.0],
        ]
    )
    sign = _ops.elect_sign(deltas)
    # Column sums 0, 1, 0, -1, 5: a zero sum elects +1.
    assert sign.tolist() == [1.0, 1.0, 1.0, -1.0, 1.0]
    # Only nonzero entries with the elected sign count; none at all gives 0.
    assert _ops.disjoint_mean(deltas, sign).tolist() == [1.0, 4.0, 0.0, -5.0, 3.0]
