"""Coefficient parametrizations and the exported weighted_delta_n merge spec."""

from __future__ import annotations

import math

import pytest
import torch

from lmerge.errors import ConfigError
from lmerge.learn.coefficients import PARAMETRIZATIONS, Coefficients, export_merge_spec

ROUND_TRIPS = {
    "clamp": [[0.0, 0.4, 1.0], [0.25, 0.5, 0.75]],
    "sigmoid": [[0.1, 0.5, 0.9], [0.2, 0.3, 0.7]],
    "tanh": [[-0.9, 0.0, 0.6], [0.3, -0.2, 0.99]],
    "softmax": [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]],
    "none": [[-2.0, 0.0, 3.5], [1.0, 0.25, -0.5]],
}


def assert_values(coefficients, expected, atol=1e-6):
    torch.testing.assert_close(torch.tensor(coefficients.values()), torch.tensor(expected), atol=atol, rtol=0)


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_values_round_trip_through_init_and_set_values(name):
    values = ROUND_TRIPS[name]
    coefficients = Coefficients(3, groups=2, parametrization=name, init=values, group_names=["layer.0", "layer.1"])
    assert coefficients.raw.dtype == torch.float32 and coefficients.raw.shape == (2, 3)
    assert_values(coefficients, values)
    coefficients.set_values(values[::-1])
    assert_values(coefficients, values[::-1])
    assert coefficients().shape == (2, 3) and coefficients.group_names == ["layer.0", "layer.1"]


def test_scalar_and_per_adapter_init_broadcast_over_groups():
    assert_values(Coefficients(2, groups=3), [[0.3, 0.3]] * 3)
    assert_values(Coefficients(2, groups=2, parametrization="sigmoid", init=[0.2, 0.7]), [[0.2, 0.7]] * 2)
    assert Coefficients(2).group_names == ["all"]


def test_clamp_projects_after_the_step_and_keeps_gradients_at_the_bounds():
    coefficients = Coefficients(3, init=[0.0, 0.5, 1.0])
    # Forward is the identity: the gradient at a bound is not zero, unlike clamping in forward.
    (coefficients() * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert coefficients.raw.grad.tolist() == [[1.0, 2.0, 3.0]]
    with torch.no_grad():
        coefficients.raw.copy_(torch.tensor([[-0.5, 0.5, 1.5]]))
    coefficients.project_()
    assert coefficients.values() == [[0.0, 0.5, 1.0]]


def test_parametrizations_without_projection_leave_raw_alone():
    coefficients = Coefficients(2, parametrization="sigmoid", init=[0.2, 0.9])
    before = coefficients.raw.detach().clone()
    coefficients.project_()
    assert torch.equal(coefficients.raw, before)


def test_softmax_rows_are_convex_and_init_is_normalized():
    coefficients = Coefficients(4, groups=3, parametrization="softmax")
    assert_values(coefficients, [[0.25] * 4] * 3)
    with torch.no_grad():
        coefficients.raw.normal_(generator=torch.Generator().manual_seed(0))
    assert coefficients().sum(-1).tolist() == pytest.approx([1.0] * 3)
    assert (coefficients() > 0).all()
    coefficients.set_values([1.0, 3.0, 0.0, 0.0])
    assert coefficients.values()[0] == pytest.approx([0.25, 0.75, 0.0, 0.0])


def test_tanh_is_signed_and_bounded():
    coefficients = Coefficients(2, parametrization="tanh", init=[-0.5, 0.5])
    with torch.no_grad():
        coefficients.raw.mul_(100)
    values = coefficients()
    assert (values.abs() <= 1).all() and values[0, 0] < 0 < values[0, 1]
    assert {name for name, p in PARAMETRIZATIONS.items() if p.signed} == {"tanh", "none"}


def test_one_hot_values_may_sit_on_the_bounds():
    for name in ("clamp", "sigmoid", "softmax"):
        coefficients = Coefficients(3, groups=2, parametrization=name)
        coefficients.set_values([0.0, 1.0, 0.0])
        assert coefficients.values() == [[0.0, 1.0, 0.0]] * 2
    coefficients = Coefficients(2, parametrization="tanh", init=0.0)
    coefficients.set_values([-1.0, 1.0])
    assert coefficients.values() == [[-1.0, 1.0]]


def test_unknown_parametrization_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="parametrization.*'cosine'.*clamp, none, sigmoid, softmax, tanh"):
        Coefficients(2, parametrization="cosine")


@pytest.mark.parametrize(
    ("name", "init"),
    [
        ("clamp", 1.5),
        ("clamp", [0.2, -0.1]),
        ("sigmoid", 1.0),  # a bound: the gradient would be zero
        ("sigmoid", 0.0),
        ("tanh", -1.0),
        ("tanh", 2.0),
        ("softmax", 0.0),
        ("softmax", [0.5, -0.5]),
        ("none", math.inf),
        ("none", math.nan),
    ],
)
def test_init_out_of_range_names_init(name, init):
    with pytest.raises(ConfigError, match=rf"^init: .* outside .* {name} parametrization"):
        Coefficients(2, parametrization=name, init=init)


def test_bad_shapes_and_values_are_refused():
    with pytest.raises(ConfigError, match=r"^init: expected .* 2x3 values, got shape \[2\]"):
        Coefficients(3, groups=2, init=[0.1, 0.2])
    with pytest.raises(ConfigError, match="^init: expected a number"):
        Coefficients(2, init="high")
    with pytest.raises(ConfigError, match="^group_names: 1 names for 2 groups"):
        Coefficients(2, groups=2, group_names=["all"])
    coefficients = Coefficients(2, parametrization="sigmoid")
    with pytest.raises(ConfigError, match="^values: .* outside"):
        coefficients.set_values([0.5, 1.5])


def test_export_task_wise():
    coefficients = Coefficients(2, init=[0.25, 0.75])
    spec = export_merge_spec(coefficients, ["a", "b"], [None], signed=False)
    assert spec == {
        "method": "weighted_delta_n",
        "adapters": ["a", "b"],
        "method_params": {
            "weights": [0.25, 0.75],
            "allow_negative_coefficients": False,
            "normalize_coefficients": False,
        },
    }


def test_export_layer_wise_with_and_without_other_group():
    values = [[0.5, 0.25], [0.75, 0.5], [0.125, 1.0]]
    coefficients = Coefficients(2, groups=3, parametrization="none", init=values)
    params = export_merge_spec(coefficients, ["a", "b"], [0, 1, None], signed=False)["method_params"]
    assert params["layer_weights"] == {0: [0.5, 0.25], 1: [0.75, 0.5]}
    assert params["weights"] == [0.125, 1.0]
    # Without an "other" group no module uses weights, but the method requires them: the mean.
    params = export_merge_spec(coefficients, ["a", "b"], [0, 1, 2], signed=False)["method_params"]
    assert params["layer_weights"] == {0: values[0], 1: values[1], 2: values[2]}
    assert params["weights"] == pytest.approx([0.4583333, 0.5833333])


def test_export_allows_negative_when_signed_or_negative():
    coefficients = Coefficients(2, parametrization="tanh", init=[0.5, 0.25])
    assert export_merge_spec(coefficients, ["a", "b"], [None], signed=True)["method_params"][
        "allow_negative_coefficients"
    ]
    coefficients.set_values([0.5, -0.25])
    assert export_merge_spec(coefficients, ["a", "b"], [None], signed=False)["method_params"][
        "allow_negative_coefficients"
    ]


def test_export_refuses_what_weighted_delta_n_cannot_express():
    coefficients = Coefficients(2, groups=2)
    with pytest.raises(ConfigError, match="layer 0 has two coefficient groups"):
        export_merge_spec(coefficients, ["a", "b"], [0, 0], signed=False)
    with pytest.raises(ConfigError, match="2 groups have no layer"):
        export_merge_spec(coefficients, ["a", "b"], [None, None], signed=False)
    with pytest.raises(ConfigError, match="group_layers: 1 entries for 2"):
        export_merge_spec(coefficients, ["a", "b"], [0], signed=False)
    with pytest.raises(ConfigError, match="adapters: 3 names"):
        export_merge_spec(coefficients, ["a", "b", "c"], [0, 1], signed=False)
