"""Seeded fuzzing: random adapter configs, random tensor shapes and random YAML fed to
``LoraAdapter``, the YAML reader and ``lmerge merge``. Every case ends in the right result
(checked against PEFT's own numbers and an independent rule) or in one-line refusal naming the
file, with nothing written. The case counts are printed (``pytest -s``)."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from test_bad_inputs import earlier_outputs, tree_digest
from transformers import AutoModelForSequenceClassification

from lmerge.__main__ import main
from lmerge.adapters import LoraAdapter
from lmerge.adapters.peft_fields import FIELDS
from lmerge.errors import LMergeError
from lmerge.yaml_files import read_yaml

SEED = 18
ADAPTER_CASES = 240
MERGE_CASES = 8
YAML_CASES = 300
YAML_MERGE_CASES = 8
PREFIX = "base_model.model."

# Fields whose random values PEFT itself reads to decide which layers get LoRA: lmerge takes the
# modules from the saved tensors instead, so fuzzing them would test PEFT, not lmerge.
_TARGETING = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}
FIELD_POOL = sorted(set(FIELDS) - _TARGETING) + ["future_variant", "enable_lora"]
VALUE_POOL = [
    None, True, False, 0, 1, 2, 4, 8, -1, 2.5, 1e308, math.nan, math.inf, -math.inf, "eight", "", "none", "all",
    "LORA", "pissa", "pissa_niter_2", "olora", "gaussian", "eva", "mica", "SEQ_CLS", [], [1], ["classifier"],
    [[0, 1]], {}, {"query": 2}, {"query": "x"}, {"(": 1}, {"value": 3.0}, {"layer.1.attention.self.query": 2},
]  # fmt: skip


def mutate_config(rng: random.Random, config: dict) -> dict:
    config = copy.deepcopy(config)
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        config[rng.choice(FIELD_POOL)] = copy.deepcopy(rng.choice(VALUE_POOL))
    return config


def mutate_tensors(rng: random.Random, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = dict(tensors)
    lora = [k for k in tensors if ".lora_" in k]
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        key = rng.choice(lora)
        value = tensors.get(key)
        if value is None or value.dim() != 2 or 0 in value.shape:
            continue
        kind = rng.randrange(10)
        if kind == 0:  # another rank, in one factor or in both
            rank = rng.choice([1, 2, 3, 8])
            tensors[key] = torch.randn(rank, value.shape[1]) if "lora_A" in key else torch.randn(value.shape[0], rank)
        elif kind == 1:  # other input or output features
            rows, columns = value.shape
            grow = rng.choice([-31, -1, 1, 64])
            shape = (rows, max(1, columns + grow)) if "lora_A" in key else (max(1, rows + grow), columns)
            tensors[key] = torch.randn(shape)
        elif kind == 2:
            del tensors[key]
        elif kind == 3:  # a module the base does not have, or that is not linear
            new = key.replace("self.query", rng.choice(["self.quux", "output.LayerNorm", "self.dropout"]))
            tensors[new] = tensors.pop(key)
        elif kind == 4:
            tensors[key] = value.half()
        elif kind == 5:
            value = value.clone()
            value.view(-1)[0] = rng.choice([math.nan, math.inf])
            tensors[key] = value
        elif kind == 6:
            tensors[key] = value.reshape(-1)
        elif kind == 7:
            tensors[key] = value[:, :0] if rng.random() < 0.5 else value.unsqueeze(0)
        elif kind == 8:
            tensors[f"{PREFIX}junk.weight"] = torch.randn(2, 2)
        else:
            tensors[f"{PREFIX}classifier.weight"] = torch.randn(3, rng.choice([16, 32, 48]))
    return tensors


def write_adapter(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    return path


def expected_scaling(config: dict, key: str) -> tuple[int, float]:
    """PEFT's rank and scaling of ``key`` from the config, by PEFT's own pattern lookup."""
    rank_patterns, alpha_patterns = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank_key = get_pattern_key(list(rank_patterns), key)
    alpha_key = get_pattern_key(list(alpha_patterns), key)
    rank = rank_patterns.get(rank_key, config.get("r", 8))
    alpha = alpha_patterns.get(alpha_key, config["lora_alpha"])
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def load_or_refuse(path: Path) -> LoraAdapter | None:
    """The adapter with every factor read, or None after checking the refusal is one line
    naming the adapter's directory."""
    try:
        adapter = LoraAdapter(path)
        for key in adapter.module_keys:
            adapter.factors(key)
        adapter.head_state()
        return adapter
    except LMergeError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message, message
        return None


def check_right(adapter: LoraAdapter, base: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """An accepted adapter is a plain LoRA that fits the base: every key a linear layer of the
    base with the factors' features, rank and scaling as PEFT computes them, factors as written."""
    for key in adapter.module_keys:
        layer = base.get_submodule(key)
        assert isinstance(layer, torch.nn.Linear), key
        A, B = adapter.factors(key)
        assert A.shape[1] == layer.in_features and B.shape[0] == layer.out_features, key
        rank, scaling = expected_scaling(adapter.config, key)
        assert A.shape[0] == B.shape[1] == rank, key
        assert adapter.scaling(key) == pytest.approx(scaling, rel=1e-12), key
        torch.testing.assert_close(A, tensors[f"{PREFIX}{key}.lora_A.weight"].float(), rtol=0, atol=0)
        torch.testing.assert_close(B, tensors[f"{PREFIX}{key}.lora_B.weight"].float(), rtol=0, atol=0)
        for name, value in adapter.head_state().items():
            assert value.shape[1:] == base.get_parameter(name.removeprefix(PREFIX)).shape[1:], name


def check_like_peft(adapter: LoraAdapter, base: torch.nn.Module) -> None:
    """PEFT loads the accepted adapter and applies the same update to every module."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter.path)
    for key in adapter.module_keys:
        expected = model.base_model.model.get_submodule(key).get_delta_weight("default")
        A, B = adapter.factors(key)
        torch.testing.assert_close(adapter.scaling(key) * B @ A, expected)


@pytest.fixture(scope="module")
def seed_adapter(zoo):
    config = json.loads((zoo["bert_a"] / "adapter_config.json").read_text())
    return config, load_file(zoo["bert_a"] / "adapter_model.safetensors")


@pytest.mark.filterwarnings("ignore")
def test_random_adapters_load_right_or_are_refused_in_one_line(zoo, seed_adapter, tmp_path):
    rng = random.Random(SEED)
    base = AutoModelForSequenceClassification.from_pretrained(zoo["bert"]).eval()
    config, tensors = seed_adapter
    counts = {"accepted": 0, "refused": 0, "base not found": 0}
    for case in range(ADAPTER_CASES):
        written = mutate_tensors(rng, tensors)
        path = write_adapter(tmp_path / f"a{case}", mutate_config(rng, config), written)
        adapter = load_or_refuse(path)
        if adapter is None:
            counts["refused"] += 1
            continue
        if adapter.unchecked_reason:
            # A base it names that cannot be found: loaded with a note (lmerge merge prints it),
            # and checked only against the other adapters of a merge.
            assert adapter.base_model != str(zoo["bert"]), adapter.unchecked_reason
            counts["base not found"] += 1
            continue
        counts["accepted"] += 1
        check_right(adapter, base, written)
        check_like_peft(adapter, base)
    print(f"fuzzed adapters: {ADAPTER_CASES} cases, {counts}")
    assert counts["accepted"] >= 20 and counts["refused"] >= 60  # both outcomes are exercised


def reference_delta(config: dict, tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    _, scaling = expected_scaling(config, key)
    A, B = (tensors[f"{PREFIX}{key}.lora_{part}.weight"].float() for part in "AB")
    return scaling * B @ A


@pytest.mark.filterwarnings("ignore")
def test_random_adapters_merge_right_or_are_refused_with_nothing_written(zoo, seed_adapter, tmp_path, capsys):
    """``lmerge merge`` of a fuzzed adapter with a sound one: an exact weighted sum saved as a
    LoRA (checked against the sum computed here), or exit 2, one error line, the root untouched."""
    rng = random.Random(SEED + 1)
    config, tensors = seed_adapter
    other_config = json.loads((zoo["bert_b"] / "adapter_config.json").read_text())
    other = load_file(zoo["bert_b"] / "adapter_model.safetensors")
    out = tmp_path / "out"
    before = earlier_outputs(out)
    outcomes = []
    for case in range(MERGE_CASES):
        written, fuzzed = (mutate_tensors(rng, tensors), mutate_config(rng, config)) if case % 2 else (tensors, config)
        path = write_adapter(tmp_path / f"m{case}", fuzzed, written)
        weights = [rng.choice([0.3, 1.0, 1e300]), 0.5]
        argv = ["merge", "--adapters", f"[{path},{zoo['bert_b']}]", "--method", "weighted_delta_n"]
        argv += ["--method_params.weights", f"[{weights[0]:.1e}, {weights[1]}]", "--output_dir", str(out)]
        code = main(argv)
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmerge: error")]
        if code == 0:
            (run,) = (out / "merged" / "weighted_delta_n" / f"m{case}_bert_b" / "runs").iterdir()
            merged = LoraAdapter(run)
            for key in merged.module_keys:
                A, B = merged.factors(key)
                expected = weights[0] * reference_delta(fuzzed, written, key)
                expected += weights[1] * reference_delta(other_config, other, key)
                torch.testing.assert_close(merged.scaling(key) * B @ A, expected, rtol=1e-4, atol=1e-5)
            shutil.rmtree(out / "merged" / "weighted_delta_n")
        else:
            assert code == 2 and len(errors) == 1, errors
        outcomes.append("merged" if code == 0 else "refused")
        assert tree_digest(out) == before
    print(f"fuzzed merges: {MERGE_CASES} cases, {outcomes}")
    assert "merged" in outcomes and "refused" in outcomes


def random_yaml(rng: random.Random) -> str:
    keys = ["adapters", "method", "method_params", "save", "lambda_policy", "tag", "a", "b", "1", "yes", "true"]
    scalars = ["ties", "0.5", "[a, b]", "{x: 1}", "*x", "&x 1", "!!python/object:os.system", "'q", "null", "~", "<<"]
    lines, depth = [], 0
    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        indent = "  " * depth
        if roll < 0.5:
            lines.append(f"{indent}{rng.choice(keys)}: {rng.choice(scalars)}")
        elif roll < 0.7:
            lines.append(f"{indent}{rng.choice(keys)}:")
            depth += 1
        elif roll < 0.8:
            lines.append(f"{indent}- {rng.choice(scalars)}")
        elif roll < 0.9:
            nest = rng.choice([1, 3, 70, 2000])
            lines.append(f"{indent}{rng.choice(keys)}: " + "[" * nest + "1" + "]" * nest)
        else:
            depth = max(0, depth - 1)
            lines.append("".join(rng.choice("ab:[]{}&*!- ,#'\"\t\n") for _ in range(rng.randint(1, 20))))
    return "\n".join(lines) + "\n"


def test_random_yaml_reads_or_is_refused_in_one_line(tmp_path, capsys):
    """Random YAML is read as a mapping or refused in one line naming the file; the first few
    that read are also handed to ``lmerge merge --config``: exit 2 with one error line and the
    output root untouched (random configs name no real adapter)."""
    rng = random.Random(SEED + 2)
    counts = {"read": 0, "refused": 0, "merge refused": 0}
    out = tmp_path / "out"
    before = earlier_outputs(out)
    for case in range(YAML_CASES):
        path = tmp_path / f"config{case}.yaml"
        path.write_text(random_yaml(rng))
        try:
            assert isinstance(read_yaml(path), dict)
            counts["read"] += 1
        except LMergeError as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)
            counts["refused"] += 1
            continue
        if counts["merge refused"] < YAML_MERGE_CASES:
            code = main(["merge", "--config", str(path), "--output_dir", str(out)])
            errors = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(errors) == 1 and errors[0].startswith("lmerge: error: "), errors
            assert tree_digest(out) == before
            counts["merge refused"] += 1
    print(f"fuzzed YAML: {YAML_CASES} cases, {counts}")
    assert counts["read"] >= 20 and counts["refused"] >= 20
