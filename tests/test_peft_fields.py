"""Every field of PEFT's LoraConfig is supported (the merge equals PEFT's own merged model),
ignored, or refused with one line naming it; wrong value types are refused the same way."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from conftest import LLAMA_TARGETS, make_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import VeloraConfig
from test_bad_inputs import assert_refused, copy_adapter, earlier_outputs
from transformers import AutoModelForCausalLM

from lmerge.__main__ import main
from lmerge.adapters import LoraAdapter
from lmerge.adapters.peft_fields import FIELDS, PEFT_VERSION

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_table_covers_every_field_of_the_installed_peft():
    assert peft.__version__ == PEFT_VERSION, "audit the new LoraConfig fields, then update PEFT_VERSION"
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert sorted(fields - set(FIELDS)) == []
    assert sorted(set(FIELDS) - fields) == []


def merged_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(run_dir).state_dict()


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    return (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().state_dict()
    )


def lmerge_full_merge(adapters: list[Path], out: Path, *options: str) -> Path:
    """``lmerge merge`` of ``adapters`` (task_vector, lambda 1: the plain sum) saved as full weights."""
    argv = ["merge", "--adapters", f"[{','.join(map(str, adapters))}]", "--method", "task_vector"]
    argv += ["--method_params.lambda", "1.0", "--save.format", "full", "--output_dir", str(out), *options]
    assert main(argv) == 0
    return sorted(out.glob("merged/task_vector/*/runs/*"))[-1]


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)


# LoraConfig settings lmerge merges, each checked against PEFT's merge_and_unload on the tiny Llama.
SUPPORTED = {
    "rslora with rank and alpha patterns": {
        "use_rslora": True,
        "rank_pattern": {"q_proj": 2},
        "alpha_pattern": {"v_proj": 3},
    },
    "init gaussian": {"init_lora_weights": "gaussian"},
    "init orthogonal": {"init_lora_weights": "orthogonal"},
    "init false": {"init_lora_weights": False},
    "init eva": {"init_lora_weights": "eva"},
    "init mica": {"init_lora_weights": "mica"},
    "velora": {"velora_config": VeloraConfig(num_groups=4)},
    "layers_to_transform": {"layers_to_transform": [1], "layers_pattern": "layers"},
    "dropout and exclude_modules": {"lora_dropout": 0.1, "exclude_modules": ["o_proj"]},
}


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_supported_fields_merge_like_peft(zoo, tmp_path, name):
    adapter = make_adapter(
        zoo["llama"], tmp_path / "adapter", seed=3, targets=LLAMA_TARGETS, task_type="CAUSAL_LM", **SUPPORTED[name]
    )
    run = lmerge_full_merge([adapter], tmp_path / "out")
    assert_same_weights(merged_weights(run), peft_merged(zoo["llama"], adapter))


def test_fan_in_fan_out_merges_like_peft_saved_full_and_as_lora(gpt2_zoo, tmp_path):
    """GPT-2's Conv1D layers (weights stored [in, out]): two adapters merged by ``lmerge merge``
    equal PEFT's add_weighted_adapter (cat) + merge_and_unload, saved full and as a LoRA."""
    base, a, b = gpt2_zoo["gpt2"], gpt2_zoo["gpt2_a"], gpt2_zoo["gpt2_b"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.4], "mix", combination_type="cat")
    model.set_adapter("mix")
    expected = model.merge_and_unload().state_dict()
    out = tmp_path / "out"
    for fmt in ("full", "lora"):
        argv = ["merge", "--adapters", f"[{a},{b}]", "--method", "weighted_delta_n", "--tag", fmt]
        argv += ["--method_params.weights", "[0.7, 0.4]", "--save.format", fmt, "--output_dir", str(out)]
        assert main(argv) == 0
    full, lora = sorted(out.glob("merged/weighted_delta_n/*/runs/*"))
    assert_same_weights(merged_weights(full), expected)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora).merge_and_unload()
    assert_same_weights(reloaded.state_dict(), expected)


def test_fan_in_fan_out_evaluation_folding_matches_peft(gpt2_zoo):
    """Evaluation folds the merge into the loaded model: the same weights as PEFT's merge."""
    from lmerge.evaluation.fold import WeightFolder
    from lmerge.merge.engine import merge_modules
    from lmerge.methods import get_method

    base, a = gpt2_zoo["gpt2"], gpt2_zoo["gpt2_a"]
    adapter = LoraAdapter(a)
    model = AutoModelForCausalLM.from_pretrained(base)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    folder = WeightFolder(model, fan_in_fan_out=adapter.fan_in_fan_out)
    method = get_method("task_vector")
    params = method.normalize_params({"lambda": 1.0}, 1)
    for module in merge_modules([adapter], adapter.module_keys, method, params, lambda layer: None):
        folder.add(module)
    assert_same_weights(model.state_dict(), peft_merged(base, a))
    folder.restore()
    assert_same_weights(model.state_dict(), original)


def test_converted_pissa_merges_and_unconverted_is_refused(zoo, tmp_path, capsys):
    """PiSSA trains on a changed base: its adapter is refused naming the field; converted the way
    PEFT documents it (save_pretrained with path_initial_model_for_weight_conversion) it is a
    plain LoRA of the original base, and lmerge's merge reproduces the trained PiSSA model."""
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config.init_lora_weights = "pissa"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(zoo["llama"]), config)
    model.save_pretrained(tmp_path / "initial")
    with torch.no_grad():  # "training": move the factors away from their initial values
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(tmp_path / "pissa")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    trained = model.merge_and_unload().state_dict()

    out = tmp_path / "out"
    before = earlier_outputs(out)
    capsys.readouterr()  # the progress bars of the set-up above
    code = main(["merge", "--adapters", f"[{tmp_path / 'pissa'}]", "--method", "task_vector", "--output_dir", str(out)])
    assert_refused(code, capsys.readouterr().err, "init_lora_weights is 'pissa'", out, before)
    run = lmerge_full_merge([tmp_path / "converted"], out)
    assert_same_weights(merged_weights(run), trained)


# (field, value) pairs whose adapters lmerge refuses, and the text its one line must hold.
REFUSED = [
    ("use_dora", True, "use_dora is true"),
    ("init_lora_weights", "olora", "init_lora_weights is 'olora'"),
    ("init_lora_weights", "pissa_niter_4", "init_lora_weights is 'pissa_niter_4'"),
    ("init_lora_weights", "corda", "init_lora_weights is 'corda'"),
    ("init_lora_weights", "loftq", "init_lora_weights is 'loftq'"),
    ("init_lora_weights", "lora_ga", "init_lora_weights is 'lora_ga'"),
    ("init_lora_weights", "fancy", "init_lora_weights: 'fancy' is not an initialization"),
    ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens is set ([5, 6])"),
    ("layer_replication", [[0, 2], [1, 2]], "layer_replication is set"),
    ("lora_bias", True, "lora_bias is true"),
    ("use_qalora", True, "use_qalora is true"),
    ("trainable_token_indices", [3, 4], "trainable_token_indices is set"),
    ("target_parameters", ["mlp.experts.down_proj"], "target_parameters is set"),
    ("megatron_config", {"tensor_model_parallel_size": 2}, "megatron_config is set"),
    ("monteclora_config", {"n_samples": 4}, "monteclora_config is set"),
    ("use_bdlora", {"nblocks": 2}, "use_bdlora is set"),
    ("arrow_config", {"top_k": 2}, "arrow_config is set"),
    ("kasa_config", {"kasa_lambda": 0.1}, "kasa_config is set"),
    ("bias", "lora_only", "bias='lora_only'"),
    ("peft_type", "LOHA", "peft_type 'LOHA' is not LORA"),
    (
        "future_variant_config",
        {"on": True},
        "future_variant_config is set ({'on': True}) but is not a LoraConfig field",
    ),
    # wrong value types: one line naming the file and key, never a traceback
    ("r", "eight", "r: expected a positive integer, got 'eight'"),
    ("r", 0, "r: expected a positive integer, got 0"),
    ("lora_alpha", [1], "lora_alpha: expected a finite number, got [1]"),
    ("lora_alpha", float("nan"), "lora_alpha: expected a finite number, got nan"),
    ("lora_alpha", float("inf"), "lora_alpha: expected a finite number, got inf"),
    ("lora_alpha", True, "lora_alpha: expected a finite number, got True"),
    ("rank_pattern", {"query(": 2}, "rank_pattern: 'query(' is not a valid regular expression"),
    ("rank_pattern", {"query": "two"}, "rank_pattern.query: expected a positive rank, got 'two'"),
    ("rank_pattern", ["query"], "rank_pattern: expected a mapping"),
    ("alpha_pattern", {"value": float("inf")}, "alpha_pattern.value: expected a finite alpha, got inf"),
    ("alpha_pattern", {"[": 1}, "alpha_pattern: '[' is not a valid regular expression"),
    ("use_rslora", "yes", "use_rslora: expected true or false, got 'yes'"),
    ("fan_in_fan_out", 1, "fan_in_fan_out: expected true or false, got 1"),
    ("modules_to_save", "classifier", "modules_to_save: expected a list of module names"),
    ("task_type", 7, "task_type: 7 is not a PEFT task type"),
]


@pytest.mark.parametrize("field,value,expected", REFUSED, ids=[f"{f}={v!r}" for f, v, _ in REFUSED])
def test_refused_fields_and_wrong_types_are_one_line(zoo, tmp_path, capsys, field, value, expected):
    path = copy_adapter(zoo, "bert_a", tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    config[field] = value
    (path / "adapter_config.json").write_text(json.dumps(config))  # NaN and Infinity as Python's json writes them
    out = tmp_path / "out"
    before = earlier_outputs(out)
    code = main(["merge", "--adapters", f"[{path}]", "--method", "ties", "--output_dir", str(out)])
    assert_refused(code, capsys.readouterr().err, f"{path / 'adapter_config.json'}: {expected}", out, before)


@pytest.mark.parametrize(
    "field,value",
    [("future_flag", False), ("enable_lora", None), ("merge_weights", False), ("megatron_core", "megatron.core")],
)
def test_unset_unknown_and_ignored_fields_load(zoo, tmp_path, field, value):
    """A field lmerge does not know is harmless while it is off (older PEFTs wrote some)."""
    path = copy_adapter(zoo, "bert_a", tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    config[field] = value
    (path / "adapter_config.json").write_text(json.dumps(config))
    reference = LoraAdapter(zoo["bert_a"])
    adapter = LoraAdapter(path)
    key = reference.module_keys[0]
    assert adapter.scaling(key) == reference.scaling(key)


def test_velora_buffers_are_skipped_and_duplicate_json_keys_refused(zoo, tmp_path):
    path = make_adapter(
        zoo["llama"],
        tmp_path / "velora",
        seed=2,
        targets=["q_proj"],
        task_type="CAUSAL_LM",
        velora_config=VeloraConfig(num_groups=4),
    )
    assert LoraAdapter(path).module_keys == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    text = (path / "adapter_config.json").read_text()
    shutil.copytree(path, tmp_path / "dup")
    (tmp_path / "dup" / "adapter_config.json").write_text(text.replace('"r": 4', '"r": 4, "r": 8', 1))
    with pytest.raises(Exception, match=r"adapter_config.json: duplicate key 'r'"):
        LoraAdapter(tmp_path / "dup")
