"""Tiny random BERT- and Llama-shaped models and real PEFT adapters, built once per session."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where there is no CUDA device, so they never fail on a CPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def peft_merge_utils() -> ModuleType:
    """``peft.utils.merge_utils`` loaded from its file: it needs only torch, while importing the
    peft package pulls in transformers and costs seconds."""
    package_dir = importlib.util.find_spec("peft").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("_peft_merge_utils", Path(package_dir, "utils", "merge_utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def build_gpt2(path: Path) -> Path:
    """A tiny random GPT-2: its attention and MLP layers are transformers' ``Conv1D``, which store
    their weight ``[in, out]`` (PEFT's ``fan_in_fan_out``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def build_llama(path: Path, vocab_size: int = 128) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
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
    alpha_pattern: dict | None = None,
    **options,
) -> Path:
    """A real PEFT LoRA adapter with random non-zero A, B (and head), saved to ``out``
    (``options``: more ``LoraConfig`` fields)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    autos = {"SEQ_CLS": AutoModelForSequenceClassification, "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM}
    auto = autos.get(task_type, AutoModelForCausalLM)
    model = auto.from_pretrained(base)
    config = LoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        **options,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.6)
            elif "modules_to_save" in name:
                # A strong head without bias, so predictions follow the inputs and differ per adapter.
                scale = 0.0 if name.endswith("bias") else 3.0
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out)
    return out


BERT_TARGETS = ["query", "value"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Base models and adapters: bert_a/b (r4), bert_c (r2, rslora), bert_d (mixed ranks),
    bert_e (r3, alpha_pattern); llama_a (r4), llama_b (r8), llama_c (r4, rslora, fewer modules),
    llama_d (r6, rslora, rank_pattern and alpha_pattern)."""
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
    paths["bert_e"] = make_adapter(
        bert, root / "bert_e", seed=10, r=3, alpha=6, alpha_pattern={"layer.0.attention.self.value": 2}, **seq
    )
    lm = {"task_type": "CAUSAL_LM"}
    paths["llama_a"] = make_adapter(llama, root / "llama_a", seed=5, targets=LLAMA_TARGETS, **lm)
    paths["llama_b"] = make_adapter(llama, root / "llama_b", seed=6, r=8, alpha=16, targets=LLAMA_TARGETS, **lm)
    paths["llama_c"] = make_adapter(
        llama, root / "llama_c", seed=7, use_rslora=True, targets=["q_proj", "v_proj"], **lm
    )
    paths["llama_d"] = make_adapter(
        llama,
        root / "llama_d",
        seed=11,
        r=6,
        alpha=12,
        use_rslora=True,
        rank_pattern={"o_proj": 2},
        alpha_pattern={"v_proj": 3},
        targets=LLAMA_TARGETS,
        **lm,
    )
    return paths


GPT2_TARGETS = ["c_attn", "c_proj"]  # c_proj is square: a missing transpose would not even fail


@pytest.fixture(scope="session")
def gpt2_zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 and two fan_in_fan_out adapters on its Conv1D layers (ranks 4 and 2)."""
    root = tmp_path_factory.mktemp("gpt2")
    base = build_gpt2(root / "gpt2")
    lm = {"task_type": "CAUSAL_LM", "targets": GPT2_TARGETS, "fan_in_fan_out": True}
    return {
        "gpt2": base,
        "gpt2_a": make_adapter(base, root / "gpt2_a", seed=11, **lm),
        "gpt2_b": make_adapter(base, root / "gpt2_b", seed=12, r=2, alpha=6, **lm),
    }


def save_bert_tokenizer(path: Path, words: list[str]) -> Path:
    """A WordPiece tokenizer over ``words`` ([PAD] = 0), saved next to a base model."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + sorted({w.lower() for w in words} - set(specials))
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    return path


def save_llama_tokenizer(path: Path, texts: list[str]) -> Path:
    """A Llama-style word-level tokenizer (BOS prepended, EOS, no pad token) trained on ``texts``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    return path


WORDS = "good bad nice film movie poor plot great awful fine boring acting the a was and".split()
TOPICS = ["sports", "music", "science"]
ANSWERS = ["yes", "no"]


def _rows(seed: int, count: int, labels: list[str]) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(2, 7, (), generator=generator))  # not the global RNG: same data in any test order
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=generator)]
        rows.append(
            {"text": " ".join(words), "label": labels[int(torch.randint(len(labels), (), generator=generator))]}
        )
    return rows


def write_task_data(root: Path, name: str, labels: list[str], seed: int) -> dict:
    """Train/validation/test json files of random short texts; the catalog's dataset entry."""
    files = {}
    for offset, (split, count) in enumerate((("train", 24), ("validation", 12), ("test", 20))):
        path = root / f"{name}_{split}.json"
        path.write_text(json.dumps(_rows(seed * 10 + offset, count, labels)))
        files[split] = path.name
    return {"path": "json", "data_files": files}


@pytest.fixture(scope="session")
def tasks(zoo, tmp_path_factory) -> Path:
    """A task catalog over the zoo: classification tasks alpha/beta (BERT adapters a/b, 3 topics)
    and label-token tasks yes/maybe (Llama adapters a/b, answers yes/no); tokenizers saved
    with the base models. Returns the catalog path."""
    import datasets
    import yaml

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("tasks")
    save_bert_tokenizer(zoo["bert"], WORDS + TOPICS)
    save_llama_tokenizer(zoo["llama"], [" ".join(WORDS + ANSWERS), "Question: Answer:"])
    entries = {}
    for name, adapter, seed in (("alpha", "bert_a", 1), ("beta", "bert_b", 2)):
        entries[name] = {
            "adapter": str(zoo[adapter]),
            "dataset": write_task_data(root, name, TOPICS, seed),
            "label_names": TOPICS,
        }
    for name, adapter, seed in (("yes", "llama_a", 3), ("maybe", "llama_b", 4)):
        entries[name] = {
            "adapter": str(zoo[adapter]),
            "kind": "label_tokens",
            "dataset": write_task_data(root, name, ANSWERS, seed),
            "label_names": ANSWERS,
            "prompt": "Question: {text} Answer:",
        }
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": entries}))
    return catalog


@pytest.fixture(scope="session")
def t5_tasks(tmp_path_factory) -> Path:
    """A tiny random T5 (encoder-decoder) with a word-level tokenizer, two LoRA adapters and a
    label-token task catalog (answers yes/no). Returns the catalog path."""
    import yaml
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("t5")
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "</s>", "<unk>"]
    backend.train_from_iterator(
        [" ".join(WORDS + ANSWERS) + " Question: Answer:"], trainers.WordLevelTrainer(special_tokens=specials)
    )
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    base = root / "t5"
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    T5ForConditionalGeneration(config).save_pretrained(base)
    entries = {}
    for name, seed in (("first", 8), ("second", 9)):
        adapter = make_adapter(base, root / name, seed=seed, targets=["q", "v"], task_type="SEQ_2_SEQ_LM")
        entries[name] = {
            "adapter": str(adapter),
            "kind": "label_tokens",
            "dataset": write_task_data(root, name, ANSWERS, seed),
            "label_names": ANSWERS,
            "prompt": "Question: {text} Answer:",
        }
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": entries}))
    return catalog


@pytest.fixture(scope="session")
def word_llama(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama whose vocabulary is its word-level tokenizer's (so whatever it generates
    decodes to words) and two LoRA adapters on it: ``base``, ``first``, ``second``."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("word_llama")
    base = save_llama_tokenizer(root / "llama", [" ".join(WORDS + ANSWERS + TOPICS), "Question: Answer:"])
    build_llama(base, vocab_size=len(AutoTokenizer.from_pretrained(base)))
    lm = {"task_type": "CAUSAL_LM", "targets": LLAMA_TARGETS}
    paths = {"base": base}
    for name, seed in (("first", 11), ("second", 12)):
        # Smaller factors than the zoo's: the adapted models still generate varied words.
        paths[name] = make_adapter(base, root / name, seed=seed, alpha=2, **lm)
    return paths


@pytest.fixture(scope="session")
def generation_catalog(word_llama, tmp_path_factory):
    """Generation tasks ``first`` and ``second`` (the word Llama's adapters; one-word answers,
    train/validation/test splits)."""
    import yaml

    root = tmp_path_factory.mktemp("generation")
    entries = {}
    for name, answers, seed in (("first", ANSWERS, 5), ("second", TOPICS, 6)):
        entries[name] = {
            "adapter": str(word_llama[name]),
            "kind": "generation",
            "dataset": write_task_data(root, name, answers, seed),
            "prompt": "Question: {text} Answer:",
            "generation": {"max_new_tokens": 3, "stop": ["."]},
        }
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": entries}))
    return catalog
