"""Tiny random BERT- and Llama-shaped models and real PEFT adapters, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_bert(path: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def build_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def make_adapter(
    base: Path,
    out: Path,
    *,
    seed: int,
    r: int = 4,
    alpha: int = 8,
    targets: list[str],
    task_type: str,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
) -> Path:
    """A real PEFT LoRA adapter with random non-zero A, B (and head), saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    model = auto.from_pretrained(base)
    config = LoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(out)
    return out


BERT_TARGETS = ["query", "value"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Base models and adapters: bert_a/b (r4), bert_c (r2, rslora), bert_d (mixed ranks);
    llama_a (r4), llama_b (r8), llama_c (r4, rslora, fewer modules)."""
    root = tmp_path_factory.mktemp("zoo")
    bert = build_bert(root / "bert")
    llama = build_llama(root / "llama")
    paths = {"bert": bert, "llama": llama}
    seq = {"task_type": "SEQ_CLS", "targets": BERT_TARGETS}
    paths["bert_a"] = make_adapter(bert, root / "bert_a", seed=1, **seq)
    paths["bert_b"] = make_adapter(bert, root / "bert_b", seed=2, **seq)
    paths["bert_c"] = make_adapter(bert, root / "bert_c", seed=3, r=2, alpha=4, use_rslora=True, **seq)
    paths["bert_d"] = make_adapter(
        bert, root / "bert_d", seed=4, rank_pattern={"layer.1.attention.self.query": 2}, **seq
    )
    lm = {"task_type": "CAUSAL_LM"}
    paths["llama_a"] = make_adapter(llama, root / "llama_a", seed=5, targets=LLAMA_TARGETS, **lm)
    paths["llama_b"] = make_adapter(llama, root / "llama_b", seed=6, r=8, alpha=16, targets=LLAMA_TARGETS, **lm)
    paths["llama_c"] = make_adapter(
        llama, root / "llama_c", seed=7, use_rslora=True, targets=["q_proj", "v_proj"], **lm
    )
    return paths
