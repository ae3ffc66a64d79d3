"""Loading PEFT adapters: factors, scaling (rslora, rank/alpha patterns), heads, alignment."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from lmerge.adapters import LoraAdapter
from lmerge.adapters.align import align_keys, check_compatible
from lmerge.adapters.lora import first_nonfinite
from lmerge.errors import AdapterError, ConfigError
from lmerge.tasks.resolve import resolve_adapters


def test_factors_and_scaling_match_peft(zoo):
    """Our (A, B, scaling) rebuild exactly the delta PEFT applies, rslora and rank_pattern included."""
    for name in ("bert_a", "bert_c", "bert_d"):
        adapter = LoraAdapter(zoo[name])
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(zoo["bert"]), zoo[name])
        for key in adapter.module_keys:
            layer = model.base_model.model.get_submodule(key)
            expected = layer.get_delta_weight("default")
            A, B = adapter.factors(key)
            torch.testing.assert_close(adapter.scaling(key) * B @ A, expected)


def test_scaling_rules(zoo):
    assert LoraAdapter(zoo["bert_a"]).scaling("bert.encoder.layer.0.attention.self.query") == 2.0
    rslora = LoraAdapter(zoo["bert_c"])
    assert rslora.scaling("bert.encoder.layer.0.attention.self.query") == pytest.approx(4 / math.sqrt(2))
    mixed = LoraAdapter(zoo["bert_d"])
    assert mixed.shapes["bert.encoder.layer.1.attention.self.query"].rank == 2
    assert mixed.scaling("bert.encoder.layer.1.attention.self.query") == 4.0


def test_heads_and_facts(zoo):
    adapter = LoraAdapter(zoo["bert_a"])
    assert sorted(adapter.head_state()) == [
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
    ]
    assert adapter.task_type == "SEQ_CLS"
    assert adapter.base_model and adapter.base_model.endswith("bert")
    assert len(adapter.sha256) == 64
    assert LoraAdapter(zoo["llama_a"]).head_state() == {}


def test_align_common_and_strict(zoo):
    adapters = [LoraAdapter(zoo["llama_a"]), LoraAdapter(zoo["llama_c"])]
    keys, dropped = align_keys(adapters, "common")
    assert len(keys) == 4 and all(k.endswith(("q_proj", "v_proj")) for k in keys)
    assert len(dropped["llama_a"]) == 10 and "llama_c" not in dropped
    with pytest.raises(AdapterError, match="strict.*'llama_a'"):
        align_keys(adapters, "strict")


def test_different_base_models_refused(zoo):
    with pytest.raises(AdapterError, match="different base models"):
        check_compatible([LoraAdapter(zoo["bert_a"]), LoraAdapter(zoo["llama_a"])])


def test_resolve_paths_and_catalog(zoo, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"tasks:\n  sentiment: {{adapter: {zoo['bert_a']}}}\n  topic: {zoo['bert_b']}\n")
    adapters = resolve_adapters(["sentiment", "topic", str(zoo["bert_c"])], catalog)
    assert [a.name for a in adapters] == ["sentiment", "topic", "bert_c"]
    with pytest.raises(ConfigError, match="'nope' is neither a directory nor a task.*sentiment, topic"):
        resolve_adapters(["nope"], catalog)
    with pytest.raises(ConfigError, match="same adapter"):
        resolve_adapters(["sentiment", str(zoo["bert_a"])], catalog)
    with pytest.raises(ConfigError, match="empty"):
        resolve_adapters([], None)


@pytest.mark.parametrize("order", ["file", "reversed", "every_other", "none"])
def test_sha256_hashed_on_the_way_is_the_files_whatever_the_reads(zoo, order):
    """Factor reads hash the bytes they pass over in file order; the digest is the file's own
    however the modules were read (backwards, some skipped, none)."""
    path = Path(zoo["llama_a"]) / "adapter_model.safetensors"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    adapter = LoraAdapter(zoo["llama_a"])
    keys = adapter.module_keys
    chosen = {"file": keys, "reversed": keys[::-1], "every_other": keys[::2], "none": []}[order]
    with adapter.reading():
        for key in chosen:
            adapter.factors(key)
    assert adapter.sha256 == expected
    A, B = adapter.factors(keys[0])  # reads after the digest is done still read the tensors
    assert A.shape[0] == B.shape[1]


def test_first_nonfinite_finds_nan_inf_and_the_limit_and_clears_large_finite_values():
    ok = torch.ones(3, 4)
    assert first_nonfinite([ok, ok]) is None and first_nonfinite([]) is None
    assert first_nonfinite([ok, torch.tensor([1.0, float("nan")])]) == 1
    assert first_nonfinite([torch.tensor([-float("inf")]), ok]) == 0
    assert first_nonfinite([torch.empty(0), ok * 7e4], limit=65504.0) == 1
    # Finite values whose norm overflows float32: the exact check clears them.
    assert first_nonfinite([torch.full((4, 4), 1e37), ok]) is None
    assert first_nonfinite([torch.full((4, 4), 1e37)], limit=1e38) is None
