"""Adapters are checked against their base model at load, before anything is written: every
factor fits the base layer its key names, every key names a linear layer, heads fit the base's;
per-layer settings name existing layers; merged results and learned coefficients are finite.
Each case runs through ``lmerge merge``: exit 2, one line naming the culprit, nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_bad_inputs import assert_refused, copy_adapter, earlier_outputs, edit_config, edit_tensors, tree_digest

from lmerge.__main__ import main
from lmerge.adapters import LoraAdapter
from lmerge.adapters.base_layout import layout_for
from lmerge.errors import MethodError

QUERY0 = "bert.encoder.layer.0.attention.self.query"


def edited(zoo, tmp: Path, name: str, edit, source: str = "bert_b") -> Path:
    return edit_tensors(copy_adapter(zoo, source, tmp / name), edit)


def narrow_b(tensors):
    """lora_B of shape [1, r]: it would broadcast over every output row."""
    key = f"base_model.model.{QUERY0}.lora_B.weight"
    tensors[key] = torch.randn(1, tensors[key].shape[1])


def wider_a(tensors):
    """Every lora_A 64 columns wider than the base layer's inputs."""
    for key in [k for k in tensors if "lora_A" in k]:
        tensors[key] = torch.randn(tensors[key].shape[0], tensors[key].shape[1] + 64)


def rename(old: str, new: str):
    def edit(tensors):
        for key in [k for k in tensors if old in k]:
            tensors[key.replace(old, new)] = tensors.pop(key)

    return edit


def head(rows: int, columns: int):
    def edit(tensors):
        tensors["base_model.model.classifier.weight"] = torch.randn(rows, columns)
        tensors["base_model.model.classifier.bias"] = torch.zeros(rows)

    return edit


def half(tensors):
    for key in tensors:
        tensors[key] = tensors[key].half()


def without_base(path: Path) -> Path:
    return edit_config(path, base_model_name_or_path=str(path.parent / "no_such_base"))


def args(*adapters: Path, method: str = "task_vector", **options) -> list[str]:
    argv = ["--adapters", f"[{','.join(map(str, adapters))}]", "--method", method]
    for name, value in options.items():
        argv += [f"--{name}", str(value)]
    return argv


# (id, builder(zoo, gpt2_zoo, tmp) -> argv after "merge", text the one error line must contain)
CASES = [
    (
        "lora_B of shape [1, r] (would broadcast)",
        lambda z, g, t: args(edited(z, t, "narrow", narrow_b), **{"save.format": "full"}),
        f"narrow/adapter_model.safetensors: module {QUERY0}: shape mismatch with the base model, lora_A is "
        "[4, 32] and lora_B [1, 4], but the base layer maps 32 features to 32",
    ),
    (
        "adapter 64 columns wider than the base",
        lambda z, g, t: args(edited(z, t, "wide", wider_a)),
        "lora_A is [4, 96] and lora_B [32, 4], but the base layer maps 32 features to 32",
    ),
    (
        "module key the base does not have",
        lambda z, g, t: args(edited(z, t, "unknown", rename("self.query", "self.quux"))),
        "module bert.encoder.layer.0.attention.self.quux: the base model",
    ),
    (
        "module key naming a non-linear layer",
        lambda z, g, t: args(edited(z, t, "norm", rename("attention.self.query", "attention.output.LayerNorm"))),
        "module bert.encoder.layer.0.attention.output.LayerNorm: the base model's LayerNorm is not a linear layer",
    ),
    (
        "classification head for another hidden size",
        lambda z, g, t: args(edited(z, t, "head", head(3, 48))),
        "head/adapter_model.safetensors: head tensor base_model.model.classifier.weight has shape [3, 48], "
        "but the base model's classifier.weight is [3, 32]",
    ),
    (
        "heads that disagree when the base is unavailable",
        lambda z, g, t: args(
            without_base(copy_adapter(z, "bert_a", t / "a")), without_base(edited(z, t, "b", head(3, 48)))
        ),
        "b/adapter_model.safetensors: head tensor base_model.model.classifier.weight has shape [3, 48], "
        "but adapter 'a' has [3, 32]",
    ),
    (
        "shapes checked against save.base_model when the adapter's base is unavailable",
        lambda z, g, t: args(
            without_base(edited(z, t, "wide", wider_a)), **{"save.format": "full", "save.base_model": z["bert"]}
        ),
        "but the base layer maps 32 features to 32",
    ),
    (
        "fan_in_fan_out false on GPT-2's Conv1D",
        lambda z, g, t: args(edit_config(copy_adapter(g, "gpt2_a", t / "gpt2"), fan_in_fan_out=False)),
        "gpt2/adapter_config.json: fan_in_fan_out is false but transformer.h.0.attn.c_attn is a Conv1D",
    ),
    (
        "fan_in_fan_out true on nn.Linear",
        lambda z, g, t: args(edit_config(copy_adapter(z, "bert_a", t / "bert"), fan_in_fan_out=True)),
        f"bert/adapter_config.json: fan_in_fan_out is true but {QUERY0} is an nn.Linear",
    ),
    (
        "adapters of different base revisions",
        lambda z, g, t: args(
            edit_config(copy_adapter(z, "bert_a", t / "a"), revision="v1"),
            edit_config(copy_adapter(z, "bert_b", t / "b"), revision="v2"),
        ),
        "adapters 'a' and 'b' come from different revisions of the base model ('v1' vs 'v2')",
    ),
    (
        "layer_weights for a layer the model does not have",
        lambda z, g, t: args(
            z["bert_a"],
            z["bert_b"],
            method="weighted_delta_n",
            **{"method_params.weights": "[0.5, 0.5]", "method_params.layer_weights": "{7: [0.1, 0.2]}"},
        ),
        "method_params.layer_weights: layer 7 is not in the adapters (layers 0-1)",
    ),
    (
        "lambda so large that a dense merge overflows",
        lambda z, g, t: args(z["bert_a"], z["bert_b"], method="ties", **{"method_params.lambda": "1.0e39"}),
        "merged module bert.encoder.layer.0.attention.self.query: the result overflows",
    ),
    (
        "weight so large that an exact merge overflows",
        lambda z, g, t: args(
            z["bert_a"], z["bert_b"], method="weighted_delta_n", **{"method_params.weights": "[1.0e300, 1.0]"}
        ),
        "the result overflows (NaN or Inf); lower lambda or the weights",
    ),
    (
        "float16 adapters whose merge float16 cannot hold",
        lambda z, g, t: args(edited(z, t, "half", half), **{"method_params.lambda": "1.0e5"}),
        "the result overflows (NaN, Inf or beyond 6.55e+04, the range it is saved in)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_adapter_for_its_base_is_one_clear_line(zoo, gpt2_zoo, tmp_path, capsys, case):
    _, build, expected = case
    out = tmp_path / "out"
    before = earlier_outputs(out)
    argv = [str(a) for a in build(zoo, gpt2_zoo, tmp_path)]
    capsys.readouterr()
    code = main(["merge", *argv, "--output_dir", str(out)])
    assert_refused(code, capsys.readouterr().err, expected, out, before)


def test_a_head_with_its_own_number_of_labels_is_accepted(zoo, tmp_path):
    path = edited(zoo, tmp_path, "five", head(5, 32))
    assert LoraAdapter(path).head_shapes["base_model.model.classifier.weight"] == [5, 32]


def test_an_unavailable_base_is_said_in_one_note(zoo, tmp_path, capsys):
    """Without a base model to check against, the merge goes on and says so in one line."""
    adapter = without_base(copy_adapter(zoo, "bert_a", tmp_path / "a"))
    assert "no_such_base" in LoraAdapter(adapter).unchecked_reason
    code = main(["merge", *args(adapter), "--output_dir", str(tmp_path / "out")])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmerge: UserWarning")]
    assert code == 0
    assert len(notes) == 1
    assert "checked between the adapters only, not against the base model: base model" in notes[0]
    assert "no_such_base' is not available locally" in notes[0]


def test_layouts_resolve_keys_of_task_models_and_of_bare_backbones(zoo):
    """Keys of a SEQ_CLS adapter (``bert.encoder...``) and of a merged bundle saved with task_type
    null resolve in the same base, whichever class the layout was built from."""
    for task_type in ("SEQ_CLS", None, "FEATURE_EXTRACTION"):
        layout = layout_for(str(zoo["bert"]), task_type)
        assert not isinstance(layout, str)
        assert layout.linear[layout.find(QUERY0, layout.modules)].in_features == 32
        assert layout.find("encoder.layer.1.attention.self.value", layout.linear) is not None
    assert "not available locally" in layout_for("no/such-model", "CAUSAL_LM")


def test_learned_nan_coefficients_are_not_exported(tasks, tmp_path):
    from lmerge.learn import AdaMerging
    from lmerge.pipeline import export_learned_merge

    learner = AdaMerging(str(tasks), ["alpha", "beta"], ["alpha", "beta"])
    with torch.no_grad():
        learner.coefficients.raw[0, 1] = math.nan
    out = tmp_path / "out"
    before = earlier_outputs(out)
    with pytest.raises(MethodError, match=r"learned coefficients: nan for adapter 'beta' in group '[^']+'; training"):
        export_learned_merge(learner, str(out), save="lora")
    assert tree_digest(out) == before


def test_adapter_config_nan_written_by_json_is_refused(zoo, tmp_path):
    path = copy_adapter(zoo, "bert_a", tmp_path / "a")
    text = (path / "adapter_config.json").read_text()
    config = json.loads(text)
    config["lora_alpha"] = float("nan")
    (path / "adapter_config.json").write_text(json.dumps(config))
    assert '"lora_alpha": NaN' in (path / "adapter_config.json").read_text()
    with pytest.raises(Exception, match="lora_alpha: expected a finite number, got nan"):
        LoraAdapter(path)


def half_with_magnitude_in_b(tensors):
    """float16, with lora_B 2^10 times larger and lora_A 2^10 times smaller: the same update."""
    for key in tensors:
        tensors[key] = (tensors[key] * (1024.0 if "lora_B" in key else 1 / 1024)).half()


def merged_adapter(out: Path) -> LoraAdapter:
    """The one LoRA a merge saved under ``out``."""
    (path,) = {weights.parent for weights in out.rglob("adapter_model.safetensors")}
    return LoraAdapter(path)


def saved_update(out: Path, key: str) -> torch.Tensor:
    adapter = merged_adapter(out)
    A, B = adapter.factors(key)
    return adapter.scaling(key) * B.double() @ A.double()


def test_a_float16_merge_that_float16_holds_is_saved_with_its_factors_balanced(zoo, tmp_path, capsys):
    """A weight of 64 puts lora_B's entries beyond float16's 65504 while the update stays small:
    the factors are saved balanced by powers of two, the update exactly the one asked for."""
    adapter = edited(zoo, tmp_path, "big_b", half_with_magnitude_in_b)
    source = LoraAdapter(adapter)
    A, B = source.factors(QUERY0)
    assert float((B * source.scaling(QUERY0) * 64).abs().max()) > 65504
    out = tmp_path / "out"
    code = main(
        [
            "merge",
            *args(adapter, method="weighted_delta_n", **{"method_params.weights": "[64.0]"}),
            "--output_dir",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    saved = merged_adapter(out)
    assert saved.dtype == torch.float16
    expected = 64 * source.scaling(QUERY0) * B.double() @ A.double()
    assert torch.allclose(saved_update(out, QUERY0), expected, rtol=2e-3, atol=1e-3 * float(expected.abs().max()))
    saved_A, saved_B = saved.factors(QUERY0)
    assert float(saved_B.abs().max()) < 65504 and float(saved_A.abs().max()) > 2**-10


@pytest.mark.parametrize("order", [("half", "single"), ("single", "half")])
def test_the_saved_dtype_is_the_widest_of_the_adapters_whatever_their_order(zoo, tmp_path, order):
    paths = {"half": edited(zoo, tmp_path, "half", half), "single": copy_adapter(zoo, "bert_a", tmp_path / "single")}
    out = tmp_path / "out"
    assert main(["merge", *args(*[paths[name] for name in order]), "--output_dir", str(out)]) == 0
    assert merged_adapter(out).dtype == torch.float32
