"""Pictures: the labelled coefficient heatmap, the task-vector statistics computed from LoRA
factors (against dense task vectors and the base weights), and the demo's report sections."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmerge.adapters import LoraAdapter
from lmerge.demo.figures import results_png
from lmerge.demo.report import task_vector_lines
from lmerge.demo.runs import MethodResult
from lmerge.evaluation.task_vectors import ALL, BaseWeights, task_vector_stats
from lmerge.layers import layer_index
from lmerge.learn.heatmap import coefficient_heatmap, figure_image, figure_png


def test_the_coefficient_heatmap_is_labelled_with_values_in_cells_and_a_scale():
    values = [[0.25, -0.5], [1.0, 0.0], [0.3, 0.7]]
    figure = coefficient_heatmap(values, ["layer.0", "layer.1", "other"], ["sentiment", "spam"])
    heat, bar = figure.axes
    assert [t.get_text() for t in heat.get_xticklabels()] == ["sentiment", "spam"]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["layer.0", "layer.1", "other"]
    assert sorted(t.get_text() for t in heat.texts) == sorted(["0.25", "-0.50", "1.00", "0.00", "0.30", "0.70"])
    image = heat.images[0]
    assert image.get_cmap().name == "RdBu_r" and image.get_clim() == (-1.0, 1.0)  # signed: diverging around 0
    assert bar.get_ylabel() == "coefficient"
    unsigned = coefficient_heatmap([[0.2, 0.4]], ["all"], ["a", "b"]).axes[0].images[0]
    assert unsigned.get_cmap().name == "viridis" and unsigned.get_clim() == (0.0, 0.4)
    assert figure_png(figure)[:4] == b"\x89PNG"
    pixels = figure_image(figure)
    assert pixels.dtype.name == "uint8" and pixels.shape[2] == 3 and pixels.shape[0] > 100


def dense_deltas(adapters, keys):
    return {
        key: [a.scaling(key) * (lambda A, B: B.double() @ A.double())(*a.factors(key)) for a in adapters]
        for key in keys
    }


def test_task_vector_statistics_from_factors_match_the_dense_task_vectors(zoo):
    """Mixed ranks (bert_d) and rslora scaling (bert_c): per-layer and whole-model cosines and
    sizes relative to the base weights equal those of the dense task vectors."""
    adapters = [LoraAdapter(zoo[name], name=name) for name in ("bert_a", "bert_c", "bert_d")]
    stats = task_vector_stats(adapters, zoo["bert"])
    keys = adapters[0].module_keys
    deltas = dense_deltas(adapters, keys)
    weights = load_file(zoo["bert"] / "model.safetensors")
    assert stats.layers == ["layer.0", "layer.1"]
    for layer in [ALL, *stats.layers]:
        chosen = [k for k in keys if layer == ALL or f"layer.{layer_index(k)}" == layer]
        flat = [torch.cat([deltas[k][i].flatten() for k in chosen]) for i in range(3)]
        cosine = [[float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for b in flat] for a in flat]
        torch.testing.assert_close(torch.tensor(stats.cosine(layer)), torch.tensor(cosine), atol=1e-9, rtol=1e-9)
        base = sum(float(weights[f"{k}.weight"].double().square().sum()) for k in chosen) ** 0.5
        expected = [float(v.norm()) / base for v in flat]
        assert stats.relative_sizes(layer) == pytest.approx(expected, rel=1e-9)
    assert abs(stats.cosine()[0][1]) < 0.5 and stats.cosine()[1][1] == pytest.approx(1.0)
    assert set(stats.to_dict()["relative_size"]) == {ALL, "layer.0", "layer.1"}


def test_base_weights_are_found_whatever_prefix_each_side_carries(zoo, tmp_path):
    base = BaseWeights(zoo["bert"])  # saved with the head model's "bert." prefix
    prefixed = base.squared_norm("bert.encoder.layer.0.attention.self.query")
    assert prefixed is not None and base.squared_norm("encoder.layer.0.attention.self.query") == prefixed
    assert base.squared_norm("encoder.layer.9.attention.self.query") is None
    assert BaseWeights(tmp_path).squared_norm("bert.encoder.layer.0.attention.self.query") is None
    stats = task_vector_stats([LoraAdapter(zoo["bert_a"]), LoraAdapter(zoo["bert_b"])], tmp_path)
    assert stats.relative_sizes() is None and len(stats.norms()) == 2  # no weights: norms only


def test_the_demo_report_and_figure_show_the_task_vectors(zoo):
    adapters = [LoraAdapter(zoo[name], name=name) for name in ("bert_a", "bert_b")]
    stats = task_vector_stats(adapters, zoo["bert"])
    text = "\n".join(task_vector_lines(stats))
    assert (
        "## Task vectors: why tasks interfere" in text and "| task | size vs base weights | layer.0 | layer.1 |" in text
    )
    assert "| bert_a | +1.000 |" in text and "| layer | bert_a / bert_b |" in text
    result = MethodResult("uniform", "static", {"x": 0.5, "y": 0.7}, 0.9, -0.1, 1.0)
    assert results_png([result], {"x": "accuracy", "y": "macro_f1"}, stats)[:4] == b"\x89PNG"
    assert results_png([result], {"x": "accuracy", "y": "macro_f1"})[:4] == b"\x89PNG"
