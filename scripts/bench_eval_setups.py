"""The random models, data, adapters and merges that ``scripts/bench_eval.py`` times, written once
per run into a temporary directory, one folder per setup:

- ``classify``: a MiniLM-shaped BERT (hidden 384, 6 layers, 12 heads, intermediate 1536, 4
  labels) with a WordPiece tokenizer over a few hundred random words, test texts of 8-40 words,
  four LoRA adapters (r=8 on query and value, with a classifier head), a classification task.
- ``generate``: a small Llama (hidden 384, 6 layers, 6 heads with 2 key-value heads, intermediate
  1024) with a word-level tokenizer over the same kind of words and no EOS token, so that every
  answer runs to ``max_new_tokens`` whatever the weights; prompts of 8-24 words, four LoRA
  adapters (r=8 on the seven projections), a generation task (greedy, 16 new tokens).

Each folder holds ``base/`` (model and tokenizer), ``test.json`` and ``warmup.json`` (its first
64 rows), ``adapters/task<i>``, ``catalog.yaml`` (tasks ``task<i>`` and ``warmup``) and
``merged.txt``: the path of lmerge's ``task_vector`` merge of the four adapters, saved exactly as
a rank-32 LoRA.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

CLASSIFY, GENERATE = "classify", "generate"
BASE, WARMUP, WARMUP_TASK = "base", 64, "warmup"
ADAPTERS, RANK, ALPHA, WORDS = 4, 8, 16, 400
LABEL_NAMES = ["north", "south", "east", "west"]
NEW_TOKENS = 16
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "Question: {text} Answer:"


def random_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct lowercase words of 3 to 9 letters."""
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))))
    return sorted(words)


def write_classification(root: Path, examples: int) -> None:
    """The ``classify`` setup (module docstring) in ``root``."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertTokenizer

    rng = random.Random(0)
    words = random_words(rng, WORDS)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(specials + words)})
    tokenizer.save_pretrained(root / BASE)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        num_labels=len(LABEL_NAMES),
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / BASE)
    rows = [
        {"text": " ".join(rng.choices(words, k=rng.randint(8, 40))), "label": rng.choice(LABEL_NAMES)}
        for _ in range(examples)
    ]
    # Loaded from the saved directory, so the adapters' base_model_name_or_path points at it.
    model = AutoModelForSequenceClassification.from_pretrained(root / BASE)
    task = {"label_names": LABEL_NAMES}
    _adapters_catalog_and_merge(root, model, rows, "SEQ_CLS", ["query", "value"], task)


def write_generation(root: Path, examples: int) -> None:
    """The ``generate`` setup (module docstring) in ``root``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    rng = random.Random(1)
    words = random_words(rng, WORDS)
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "Question:", "Answer:", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(root / BASE)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=None,
        pad_token_id=0,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(root / BASE)
    rows = [
        {"text": " ".join(rng.choices(words, k=rng.randint(8, 24))), "label": rng.choice(words)}
        for _ in range(examples)
    ]
    model = AutoModelForCausalLM.from_pretrained(root / BASE)
    task = {"kind": "generation", "prompt": PROMPT, "generation": {"max_new_tokens": NEW_TOKENS}}
    _adapters_catalog_and_merge(root, model, rows, "CAUSAL_LM", LLAMA_TARGETS, task)


def _adapters_catalog_and_merge(
    root: Path, model: nn.Module, rows: list[dict[str, str]], task_type: str, targets: list[str], task: dict[str, Any]
) -> None:
    """Write the test data, four random adapters of ``model``, the catalog (``task`` holds each
    task's entry beyond its adapter and data) and the saved ``task_vector`` merge of the adapters."""
    import yaml
    from peft import LoraConfig, get_peft_model

    from lmerge.merge.config import MergeConfig, SaveConfig
    from lmerge.pipeline import run_merge

    (root / "test.json").write_text(json.dumps(rows))
    (root / "warmup.json").write_text(json.dumps(rows[:WARMUP]))
    wrapped = get_peft_model(model, LoraConfig(task_type=task_type, r=RANK, lora_alpha=ALPHA, target_modules=targets))
    tasks: dict[str, dict[str, Any]] = {}
    for i in range(ADAPTERS):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in wrapped.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
        wrapped.save_pretrained(root / "adapters" / f"task{i}")
        data = {"path": "json", "data_files": {"test": "test.json"}}
        tasks[f"task{i}"] = {"adapter": f"adapters/task{i}", "dataset": data, **task}
    warmup = {**tasks["task0"], "dataset": {"path": "json", "data_files": {"test": "warmup.json"}}}
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": {**tasks, WARMUP_TASK: warmup}}))
    merged = run_merge(
        MergeConfig(
            adapters=list(tasks),
            method="task_vector",
            catalog=str(catalog),
            save=SaveConfig(format="lora", rank=ADAPTERS * RANK),
            output_dir=str(root / "merges"),
        )
    )
    (root / "merged.txt").write_text(str(merged.run_dir))


SETUPS = {CLASSIFY: write_classification, GENERATE: write_generation}
