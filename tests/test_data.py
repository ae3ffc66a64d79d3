"""Task specs and catalog, sampling weights, eval subsets and the DataModules, on tiny local data."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import save_bert_tokenizer, save_llama_tokenizer  # noqa: E402

from lmerge.data import subsets  # noqa: E402
from lmerge.data.multitask import MultiTaskDataModule  # noqa: E402
from lmerge.data.sampling import EpochSampler, ResumableLoader, make_sampler, sampling_strategy, sampling_weights  # noqa: E402
from lmerge.data.subsets import select_subset, subset_indices, subset_namespace  # noqa: E402
from lmerge.data.task_module import TaskDataModule  # noqa: E402
from lmerge.errors import ConfigError  # noqa: E402
from lmerge.tasks.catalog import load_catalog  # noqa: E402
from lmerge.tasks.spec import TaskSpec, load_task_catalog  # noqa: E402

PROMPT = "Review: {text}\nSentiment:"
NAMES = ["negative", "positive"]
TRAIN = [
    ("a good movie", "positive"),
    ("the plot was great", "positive"),
    ("bad film", "negative"),
    ("nice acting and a fine plot", "positive"),
    ("good", "positive"),
    ("awful poor boring movie", "negative"),
    ("great great film", "positive"),
    ("the movie was nice", "positive"),
]
VALIDATION = [("a great film", "positive"), ("bad plot", 0), ("poor acting", "negative"), ("good movie", 1)]
TEST = [(f"film {i}", NAMES[i % 2]) for i in range(10)]
TOPIC = [(f"{word} plot", i % 3) for i, word in enumerate(["good", "bad", "nice", "film", "movie", "poor"] * 2)]


def write_rows(path: Path, rows: list[tuple], text: str = "text", label: str = "label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{text: t, label: y} for t, y in rows]))
    return path


def corpus() -> list[str]:
    rows = TRAIN + VALIDATION + TEST + TOPIC
    return [t for t, _ in rows] + [PROMPT.replace("{text}", ""), " ".join(NAMES)]


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keep the datasets cache (and its progress bars) out of the user's home and the test log."""
    import datasets

    datasets.disable_progress_bars()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_rows(root / "train.json", TRAIN)
    write_rows(root / "validation.json", VALIDATION)
    write_rows(root / "test.json", TEST)
    write_rows(root / "topic_train.json", TOPIC)
    write_rows(root / "topic_validation.json", TOPIC[:5])
    return root


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory) -> str:
    """A WordPiece tokenizer over the tiny data's words ([PAD] = 0), saved like a base model's."""
    words = [w for line in corpus() for w in line.split()]
    return str(save_bert_tokenizer(tmp_path_factory.mktemp("bert_tokenizer"), words))


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory) -> str:
    """A Llama-style tokenizer: word-level, BOS prepended, EOS but no pad token."""
    return str(save_llama_tokenizer(tmp_path_factory.mktemp("llama_tokenizer"), corpus()))


def sentiment(data_dir: Path, **fields) -> dict:
    files = {s: str(data_dir / f"{s}.json") for s in ("train", "validation", "test")}
    return {"name": "sentiment", "dataset": {"path": "json", "data_files": files}, "label_names": NAMES, **fields}


# --- catalog -----------------------------------------------------------------------------------


def test_catalog_resolves_relative_paths_and_keeps_the_shorthand(tmp_path):
    catalog = tmp_path / "configs" / "catalog.yaml"
    catalog.parent.mkdir()
    catalog.write_text(
        "tasks:\n"
        "  sentiment:\n"
        "    adapter: ../adapters/sentiment\n"
        "    kind: label_tokens\n"
        "    dataset: {path: json, data_files: {train: data/train.json, test: [data/t1.json, data/t2.json]}}\n"
        "    splits: {train: train, test: test}\n"
        "    label_names: [negative, positive]\n"
        '    prompt: "Review: {text}\\nSentiment:"\n'
        "    max_length: 64\n"
        "  question: adapters/question\n"
        "  unlabeled:\n"
        "    dataset: {path: json, data_files: /abs/u.json}\n"
    )
    specs = load_task_catalog(catalog)
    here = catalog.parent.resolve()
    spec = specs["sentiment"]
    assert spec.adapter == str(tmp_path.resolve() / "adapters" / "sentiment")
    assert spec.dataset == {
        "path": "json",
        "data_files": {
            "train": str(here / "data/train.json"),
            "test": [str(here / "data/t1.json"), str(here / "data/t2.json")],
        },
    }
    assert (spec.kind, spec.label_names, spec.prompt, spec.max_length) == ("label_tokens", NAMES, PROMPT, 64)
    assert (spec.text_column, spec.label_column, spec.metric) == ("text", "label", "accuracy")
    assert specs["question"] == TaskSpec(name="question", adapter=str(here / "adapters" / "question"))
    assert specs["unlabeled"].adapter is None and specs["unlabeled"].dataset["data_files"] == "/abs/u.json"
    # The adapter-only view that resolve_adapters uses is unchanged, and still insists on adapters.
    with pytest.raises(ConfigError, match="tasks.unlabeled.adapter must be a path"):
        load_catalog(catalog)
    catalog.write_text(catalog.read_text().split("  unlabeled:")[0])
    assert load_catalog(catalog)["sentiment"]["adapter"] == spec.adapter


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{adapter: a, colour: red}", "tasks.t: unknown key 'colour'"),
        ("{adapter: a, kind: regression}", "task t: unknown kind 'regression'"),
        ("{adapter: a, prompt: 'Q: {text}'}", "task t: prompt is for kind 'label_tokens' or 'generation' only"),
        ("{adapter: a, kind: label_tokens, prompt: 'no slot'}", "task t: prompt must contain '{text}'"),
        ("{adapter: a, metric: wer}", "task t: metric 'wer' needs kind 'label_tokens'"),
        ("{adapter: a, splits: {dev: validation}}", "task t: unknown split 'dev'"),
        ("{adapter: a, label_names: [x, x]}", "task t: label_names must be distinct"),
        ("{kind: classification}", "tasks.t needs an adapter, a dataset or both"),
        ("{adapter: a, dataset: {data_files: x.json}}", "tasks.t.dataset must be a mapping .* with a 'path'"),
    ],
)
def test_catalog_rejects_bad_entries(tmp_path, entry, message):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"tasks:\n  t: {entry}\n")
    with pytest.raises(ConfigError, match=message):
        load_task_catalog(catalog)


def test_every_kind_file_registers_its_own_kind_only():
    import pkgutil

    import lmerge.tasks.kinds
    from lmerge.tasks.kinds import KINDS, get_kind

    files = [
        m.name
        for m in pkgutil.iter_modules(lmerge.tasks.kinds.__path__)
        if not m.name.startswith("_") and m.name != "registry"
    ]
    assert files
    by_module: dict[str, list[str]] = {}
    for name, kind in KINDS.items():
        by_module.setdefault(type(kind).__module__, []).append(name)
    assert sorted(by_module) == sorted(f"lmerge.tasks.kinds.{file}" for file in files)
    for file in files:
        assert by_module[f"lmerge.tasks.kinds.{file}"] == [file]
    with pytest.raises(ConfigError, match=f"unknown kind 'regression'; valid: {', '.join(sorted(KINDS))}$"):
        get_kind("regression")


def test_missing_column_names_task_file_and_existing_columns(tmp_path):
    path = write_rows(tmp_path / "reviews.json", TRAIN, text="sentence")
    spec = TaskSpec(name="sentiment", dataset={"path": "json", "data_files": {"train": str(path)}}, label_names=NAMES)
    with pytest.raises(ConfigError) as error:
        spec.load_split("train")
    message = str(error.value)
    assert "task sentiment" in message and "reviews.json (split train)" in message
    assert "no column 'text'" in message and "columns: sentence, label" in message
    with pytest.raises(ConfigError, match=r"task sentiment: no 'test' split \(available: train\)"):
        spec.load_split("test")


def test_unknown_label_names_task_split_row_and_value(data_dir, tmp_path, bert_tokenizer):
    rows = [*VALIDATION[:2], ("meh", "neutral")]
    fields = sentiment(data_dir)
    fields["dataset"]["data_files"]["validation"] = str(write_rows(tmp_path / "v.json", rows))
    module = TaskDataModule(tokenizer=bert_tokenizer, **fields)
    with pytest.raises(ConfigError, match=r"task sentiment: split validation, row 2: unknown label 'neutral'"):
        module.setup("validate")
    # Without label_names a classification label must be a class id.
    plain = TaskSpec(name="topic", dataset=fields["dataset"])
    with pytest.raises(ConfigError, match=r"task topic: split train, row 0: unknown label 'positive'"):
        plain.encode_labels(["positive"], "train")
    assert plain.encode_labels([2, 0], "train") == [2, 0]


# --- batches -----------------------------------------------------------------------------------


def test_classification_batches(data_dir, bert_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bert_tokenizer)
    module = TaskDataModule(tokenizer=bert_tokenizer, batch_size=4, max_length=6, **sentiment(data_dir))
    module.setup("fit")
    batch = next(iter(module.dataloader("validation")))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].tolist() == [1, 0, 0, 1]  # names and ids in the data both map to class ids
    expected = tokenizer([t for t, _ in VALIDATION])["input_ids"]
    width = max(map(len, expected))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, width)
    for row, ids in enumerate(expected):
        padded = ids + [tokenizer.pad_token_id] * (width - len(ids))
        assert batch["input_ids"][row].tolist() == padded
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (width - len(ids))
    long = next(iter(module.dataloader("train")))["input_ids"]
    assert long.shape == (4, 6)  # "nice acting and a fine plot" is cut to max_length
    assert module.label_counts("train") == {"negative": 2, "positive": 6}
    assert module.label_counts("validation") == {"negative": 2, "positive": 2}
    torch.testing.assert_close(module.class_prior(), torch.tensor([0.25, 0.75]))


def test_evaluation_batches_by_length_hold_every_example_once_and_pad_less(data_dir, bert_tokenizer):
    module = TaskDataModule(tokenizer=bert_tokenizer, batch_size=2, max_length=16, **sentiment(data_dir))
    module.setup("fit")

    def rows(loader) -> tuple[list[tuple[list[int], int]], int]:
        examples, padded = [], 0
        for batch in loader:
            padded += batch["input_ids"].numel()
            for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
                examples.append((ids[mask.bool()].tolist(), int(label)))
        return examples, padded

    in_order, padded_in_order = rows(module.dataloader("train", batch_size=2))
    by_length, padded_by_length = rows(module.dataloader("train", batch_size=2, by_length=True))
    assert sorted(by_length) == sorted(in_order)  # the same examples, each once, labels kept
    assert [len(ids) for ids, _ in by_length] == sorted(len(ids) for ids, _ in in_order)
    assert padded_by_length < padded_in_order
    # Lightning's validation and test loaders, and the evaluator, batch by length.
    assert rows(module.val_dataloader())[0] == rows(module.dataloader("validation", by_length=True))[0]


def test_label_token_batches_mask_everything_but_the_answer(data_dir, llama_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id is None  # padding falls back to EOS
    module = TaskDataModule(
        tokenizer=llama_tokenizer, kind="label_tokens", prompt=PROMPT, batch_size=4, **sentiment(data_dir)
    )
    batch = next(iter(module.dataloader("validation")))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "class_ids", "candidates"}
    assert batch["class_ids"].tolist() == [1, 0, 0, 1]
    answers = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] + [eos] for name in NAMES]
    width = max(map(len, answers))
    assert batch["candidates"].tolist() == [a + [-100] * (width - len(a)) for a in answers]
    length = batch["input_ids"].shape[1]
    for row, (text, _) in enumerate(VALIDATION):
        prompt = tokenizer(PROMPT.replace("{text}", text))["input_ids"]
        assert prompt[0] == tokenizer.bos_token_id
        answer = answers[batch["class_ids"][row]]
        k, n = len(prompt), len(prompt) + len(answer)
        pad = length - n
        assert batch["input_ids"][row].tolist() == prompt + answer + [eos] * pad
        assert batch["labels"][row].tolist() == [-100] * k + answer + [-100] * pad
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * pad


def test_label_tokens_truncate_the_prompt_start_and_free_text_answers(data_dir, tmp_path, llama_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer)
    module = TaskDataModule(
        tokenizer=llama_tokenizer, kind="label_tokens", prompt=PROMPT, max_length=7, **sentiment(data_dir)
    )
    example = module.dataloader("train").dataset[5]  # "awful poor boring movie" -> negative
    tail = tokenizer("Sentiment:", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" negative", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(example["input_ids"]) == 7 and example["input_ids"][0] == tokenizer.bos_token_id
    assert example["input_ids"][example["prompt_length"] - len(tail) :] == tail + answer
    # Answers that are free text (no label_names): no class ids or candidates, the text is the target.
    path = write_rows(tmp_path / "asr.json", [("good movie", "the plot"), ("bad film", "nice")])
    free = TaskDataModule(
        name="asr", tokenizer=llama_tokenizer, dataset={"path": "json", "data_files": str(path)}, kind="label_tokens"
    )
    batch = next(iter(free.dataloader("train")))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    target = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert target == tokenizer(" the plot", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert free.label_counts("train") == {"nice": 1, "the plot": 1}


# --- sampling ----------------------------------------------------------------------------------

LABELS = ["a", "a", "a", "b", "c", "c"]


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("none", [1, 1, 1, 1, 1, 1]),
        ("uniform", [1, 1, 1, 1, 1, 1]),
        ("inverse", [1 / 3, 1 / 3, 1 / 3, 1, 1 / 2, 1 / 2]),
        ("sqrt_inverse", [1 / math.sqrt(3)] * 3 + [1, 1 / math.sqrt(2), 1 / math.sqrt(2)]),
        ("balanced", [1 / 9, 1 / 9, 1 / 9, 1 / 3, 1 / 6, 1 / 6]),
    ],
)
def test_sampling_weights(strategy, expected):
    torch.testing.assert_close(sampling_weights(LABELS, strategy), torch.tensor(expected, dtype=torch.float64))


def test_sampler_is_seeded_and_balances_classes():
    plain = make_sampler(LABELS, "none", seed=1)
    assert sorted(plain) == list(range(len(LABELS)))  # a permutation: plain shuffling
    first = list(plain)
    plain.set_epoch(1)
    assert sorted(plain) == list(range(len(LABELS))) and list(plain) != first or len(LABELS) < 3
    plain.set_epoch(0)
    assert list(plain) == first  # the order is a function of seed and epoch alone (exact resume)
    sampler = make_sampler(LABELS, "balanced", seed=3)
    assert len(sampler) == len(LABELS) and list(sampler) == list(make_sampler(LABELS, "balanced", seed=3))
    drawn = Counter(LABELS[i] for i in make_sampler(LABELS, "inverse", seed=0, num_samples=30_000))
    assert all(abs(count / 30_000 - 1 / 3) < 0.02 for count in drawn.values())
    with pytest.raises(ConfigError, match="unknown sampling strategy 'square'; valid: balanced, inverse"):
        sampling_weights(LABELS, "square")


def test_training_loader_resumes_mid_epoch_from_its_state():
    def loader():
        return ResumableLoader(list(range(10)), make_sampler(["a", "b"] * 5, "sqrt_inverse", seed=5), batch_size=3)

    whole = [batch.tolist() for batch in loader()]
    interrupted = loader()
    running = iter(interrupted)
    next(running), next(running)
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "batches": 2}
    resumed = loader()
    resumed.load_state_dict(state)
    assert [batch.tolist() for batch in resumed] == whole[2:]
    assert [batch.tolist() for batch in resumed] == whole  # the pass after it is whole again
    other_epoch = loader()
    other_epoch.load_state_dict(state)
    other_epoch.sampler.set_epoch(1)  # a state of epoch 0 does not cut a pass of epoch 1
    assert len(list(other_epoch)) == 4


def _padded_tokens(order: list[int], lengths: list[int], batch: int) -> int:
    batches = [order[k : k + batch] for k in range(0, len(order), batch)]
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


@pytest.mark.parametrize("strategy", ["none", "inverse"])
def test_grouping_by_length_keeps_the_draws_and_cuts_padding(strategy):
    lengths = [int(n) for n in torch.randint(1, 200, (1000,), generator=torch.Generator().manual_seed(0))]
    labels = [n % 3 for n in lengths]
    plain = list(make_sampler(labels, strategy, seed=4))
    grouped = make_sampler(labels, strategy, seed=4, lengths=lengths, batch_size=8)
    order = list(grouped)
    # The same draws (a permutation of each run of 50 batches), regrouped.
    assert len(order) == len(plain) and Counter(order) == Counter(plain)
    assert all(sorted(order[k : k + 400]) == sorted(plain[k : k + 400]) for k in range(0, 1000, 400))
    batches = [order[k : k + 8] for k in range(0, 400, 8)]
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 20 for b in batches)  # close lengths
    assert _padded_tokens(order, lengths, 8) < 0.7 * _padded_tokens(plain, lengths, 8)
    # Batch order within a run is shuffled, not longest-last; seeded and epoch-aware like the plain order.
    means = [sum(lengths[i] for i in b) for b in batches]
    assert means != sorted(means) and order == list(make_sampler(labels, strategy, 4, lengths=lengths, batch_size=8))
    grouped.set_epoch(1)
    assert list(grouped) != order


def test_grouping_by_length_keeps_a_partial_batch_last_and_groups_the_global_batch(monkeypatch):
    lengths = [(7 * i) % 23 for i in range(45)]
    order = list(EpochSampler(45, seed=1, lengths=lengths, batch_size=4))
    assert sorted(order) == list(range(45))
    assert lengths[order[-1]] == max(lengths)  # 45 = 11 * 4 + 1: the sorted run's last draw stays last
    batches = [order[k : k + 4] for k in range(0, 44, 4)]
    assert all(batch == sorted(batch, key=lengths.__getitem__) for batch in batches)
    # Two processes with batch 2 each: every global batch of 4 is grouped, and each process's half too.
    together = list(EpochSampler(44, seed=1, lengths=lengths[:44], batch_size=4))
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr("lmerge.data.sampling._process_group", lambda rank=rank: (rank, 2))
        shares.append(list(EpochSampler(44, seed=1, lengths=lengths[:44], batch_size=2)))
    for k in range(11):
        pairs = [shares[0][2 * k : 2 * k + 2], shares[1][2 * k : 2 * k + 2]]
        assert sorted(pairs[0] + pairs[1]) == sorted(together[4 * k : 4 * k + 4])


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (None, {"a": "none", "b": "none"}),
        ({"default": {"enabled": True, "strategy": "inverse"}}, {"a": "inverse", "b": "inverse"}),
        (
            {"default": {"enabled": False, "strategy": "inverse"}, "per_task": {"a": {"enabled": True}}},
            {"a": "inverse", "b": "none"},
        ),
        (
            {
                "default": {"enabled": True, "strategy": "inverse"},
                "per_task": {"a": {"strategy": "balanced"}, "b": {"enabled": False}},
            },
            {"a": "balanced", "b": "none", "c": "inverse"},
        ),
        ({"per_task": {"a": {"strategy": "sqrt_inverse"}}}, {"a": "sqrt_inverse", "b": "none"}),
    ],
)
def test_sampling_config_per_task(config, expected):
    assert {task: sampling_strategy(config, task) for task in expected} == expected


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"default": {"enabled": True}}, "enabled for task a but no strategy"),
        ({"per_task": {"b": {"strategy": "often"}}}, r"sampling.per_task.b.strategy: unknown strategy 'often'"),
        ({"default": {"enable": True}}, "sampling.default: unknown key 'enable'"),
        ({"defaults": {}}, "sampling: unknown key 'defaults'"),
    ],
)
def test_sampling_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        sampling_strategy(config, "a")


def test_training_loader_uses_the_sampler(data_dir, bert_tokenizer):
    weighted = TaskDataModule(tokenizer=bert_tokenizer, sampling="inverse", **sentiment(data_dir))
    sampler = weighted.train_dataloader().sampler
    assert isinstance(sampler, EpochSampler) and sampler.weights is not None
    assert isinstance(weighted.dataloader("test").sampler, torch.utils.data.SequentialSampler)
    plain = TaskDataModule(tokenizer=bert_tokenizer, **sentiment(data_dir))
    assert (
        isinstance(plain.train_dataloader().sampler, EpochSampler) and plain.train_dataloader().sampler.weights is None
    )
    first = [b["labels"].tolist() for b in plain.train_dataloader()]
    assert first == [b["labels"].tolist() for b in plain.train_dataloader()]  # seeded order
    grouped = TaskDataModule(tokenizer=bert_tokenizer, group_by_length=True, batch_size=2, **sentiment(data_dir))
    batches = [b["input_ids"] for b in grouped.train_dataloader()]
    assert sum(len(b) for b in batches) == len(TRAIN) and grouped.train_dataloader().sampler.lengths is not None
    plain_two = TaskDataModule(tokenizer=bert_tokenizer, batch_size=2, **sentiment(data_dir))
    assert sum(b.numel() for b in batches) < sum(b["input_ids"].numel() for b in plain_two.train_dataloader())


# --- eval subsets ------------------------------------------------------------------------------

SKEWED = [0] * 60 + [1] * 30 + [2] * 9 + [3] * 1


@pytest.mark.parametrize(
    ("k", "expected"), [(20, {0: 12, 1: 6, 2: 1, 3: 1}), (10, {0: 5, 1: 3, 2: 1, 3: 1}), (3, {0: 1, 1: 1, 2: 1})]
)
def test_stratified_subset_is_proportional_with_every_class(k, expected):
    indices = select_subset(SKEWED, k, seed=0)
    assert indices == sorted(set(indices)) and len(indices) == k
    assert Counter(SKEWED[i] for i in indices) == expected


def test_subset_is_deterministic_across_calls_and_processes():
    labels = [i % 3 for i in range(30)]
    indices = select_subset(labels, 6, seed=7)
    assert indices == select_subset(labels, 6, seed=7) != select_subset(labels, 6, seed=8)
    # Pinned: numpy's seeded PCG64 and SHA-256 digests, the same in every process and run.
    assert indices == [0, 7, 13, 14, 20, 24]  # two of each class
    assert select_subset(labels, 6, seed=7, stratified=False) == [4, 12, 14, 22, 24, 28]
    assert select_subset(labels, 6, shuffle=False, stratified=False) == [0, 1, 2, 3, 4, 5]
    assert select_subset(labels, 6, shuffle=False) == [0, 1, 2, 3, 4, 5]
    assert subset_namespace({"max_samples": 6, "seed": 7}) == "subset_bd1403bc"


def test_subset_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    config = {"enabled": True, "seed": 1, "max_samples": 50, "per_task": {"sentiment": {"max_samples": 10}}}
    indices = subset_indices(SKEWED, task="sentiment", split="test", config=config, cache_dir=tmp_path)
    assert len(indices) == 10
    [path] = tmp_path.iterdir()
    assert re.fullmatch(r"sentiment_test_[0-9a-f]{8}\.json", path.name)
    assert json.loads(path.read_text())["indices"] == indices

    def no_selection(*args, **kwargs):
        raise AssertionError("the cached indices should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(subsets, "select_subset", no_selection)
        assert subset_indices(SKEWED, task="sentiment", split="test", config=config, cache_dir=tmp_path) == indices
    # Other data under the same name is not served stale indices.
    changed = SKEWED[::-1]
    fresh = subset_indices(changed, task="sentiment", split="test", config=config, cache_dir=tmp_path)
    assert Counter(changed[i] for i in fresh) == Counter(SKEWED[i] for i in indices)
    # The global max_samples for other tasks, and nothing to cache when the split is small enough.
    assert len(subset_indices(SKEWED, task="topic", split="test", config=config, cache_dir=tmp_path)) == 50
    assert subset_indices(SKEWED[:40], task="topic", split="test", config=config) is None
    assert subset_indices(SKEWED, task="topic", split="test", config={"enabled": False, "max_samples": 5}) is None


def test_subset_namespace():
    assert subset_namespace(None) == subset_namespace({"enabled": False, "max_samples": 5}) == "full"
    assert subset_namespace({"enabled": True}) == "full"  # no limit: every example is kept
    base = {
        "enabled": True,
        "seed": 0,
        "max_samples": 100,
        "per_task": {"a": {"max_samples": 5}, "b": {"max_samples": 9}},
    }
    name = subset_namespace(base)
    assert re.fullmatch(r"subset_[0-9a-f]{8}", name)
    reordered = {"per_task": {"b": {"max_samples": 9}, "a": {"max_samples": 5}}, "max_samples": 100, "seed": 0}
    assert subset_namespace(reordered) == name  # defaults filled, key order ignored
    assert len({name, subset_namespace({**base, "seed": 1}), subset_namespace({**base, "stratified": False})}) == 3
    with pytest.raises(ConfigError, match="eval_subset.per_task.a.max_samples: expected a positive integer"):
        subset_namespace({"per_task": {"a": {"max_samples": 0}}})


def test_data_module_applies_the_eval_subset(data_dir, tmp_path, bert_tokenizer):
    spec = TaskSpec(**sentiment(data_dir))
    config = {"max_samples": 4, "seed": 0}
    module = TaskDataModule.from_spec(spec, bert_tokenizer, eval_subset=config, subset_cache_dir=tmp_path)
    assert set(module.subsets) == {"test"}  # validation has only 4 rows: kept whole
    assert len(module.dataloader("test").dataset) == 4
    assert module.label_counts("test") == {"negative": 2, "positive": 2}
    assert module.label_counts("train") == {"negative": 2, "positive": 6}  # training data is whole
    assert len(list(tmp_path.iterdir())) == 1


# --- several tasks -----------------------------------------------------------------------------


def test_combined_loader_gives_one_batch_per_task_per_step(data_dir, bert_tokenizer):
    topic = TaskSpec(
        name="topic",
        dataset={
            "path": "json",
            "data_files": {
                "train": str(data_dir / "topic_train.json"),
                "validation": str(data_dir / "topic_validation.json"),
            },
        },
    )
    multi = MultiTaskDataModule.from_specs(
        [TaskSpec(**sentiment(data_dir)), topic],
        bert_tokenizer,
        batch_size=4,
        sampling={"per_task": {"topic": {"strategy": "balanced"}}},
    )
    assert multi.tasks["topic"].sampling == "balanced" and multi.tasks["sentiment"].sampling == "none"
    multi.setup("fit")
    train = multi.train_dataloader()
    steps = list(train)
    assert len(steps) == 3  # max_size_cycle: the longest task (12 rows / 4) sets the length
    for batch, _, _ in steps:
        assert set(batch) == {"sentiment", "topic"}
        assert batch["sentiment"]["labels"].shape == batch["topic"]["labels"].shape == (4,)
    assert multi.split_tasks("validation") == ["sentiment", "topic"]
    assert multi.split_tasks("test") == ["sentiment"]
    seen = Counter(index for _, _, index in multi.val_dataloader())
    assert seen == {0: 1, 1: 2}  # sequential: sentiment's 4 rows, then topic's 5 (batches of 4)
    with pytest.raises(ConfigError, match="task 'topic' is given twice"):
        MultiTaskDataModule([multi.tasks["topic"], multi.tasks["topic"]])


def test_trainer_steps_through_the_multitask_module(data_dir, tmp_path, bert_tokenizer):
    import lightning as L

    topic = TaskSpec(name="topic", dataset={"path": "json", "data_files": str(data_dir / "topic_train.json")})
    multi = MultiTaskDataModule.from_specs(
        [TaskSpec(**sentiment(data_dir)), topic], bert_tokenizer, batch_size=4, eval_subset={"max_samples": 3}
    )
    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.append(("train", sorted(batch)))
            return self.weight.sum() * sum(b["labels"].sum() for b in batch.values())

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            seen.append(("validation", dataloader_idx, len(batch["labels"])))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(Probe(), datamodule=multi)
    # Topic (12 rows, no validation split) sets three training steps; sentiment's validation is cut to 3 rows.
    assert seen == [("train", ["sentiment", "topic"])] * 3 + [("validation", 0, 3)]
