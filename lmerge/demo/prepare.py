"""Build the demo's four tasks from the packaged files: parse, deduplicate, split (seeded), write.

Every task is deduplicated before it is split, so no text is in two splits: TREC's file stacks
its nested training subsets (15,452 lines, about 5,400 distinct questions), and the SMS
collection repeats about 7% of its messages. A text that appears with two different labels is
ambiguous and dropped. For language identification, chatterbot-corpus leaves many utterances
untranslated (its Swedish folder is mostly English), so a text found under more than one
language is dropped, then every language left with fewer than ``min_language_examples``.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmerge.demo.sources import LANGUAGES, DemoSources
from lmerge.errors import ConfigError
from lmerge.outputs import write_bytes_atomic

Row = tuple[str, str]  # (text, label)


def read_sentiment(path: Path, threshold: float = 0.5) -> list[Row]:
    """VADER snippets labelled ``pos``/``neg`` by the sign of the mean rating; ratings closer
    to zero than ``threshold`` are neutral and left out."""
    rows = []
    lines = _read_text(path).splitlines()
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            raise ConfigError(f"{path}:{number}: rating {parts[1]!r} is not a number") from None
        if abs(rating) >= threshold:
            rows.append((parts[2], "pos" if rating > 0 else "neg"))
    return rows


def read_questions(path: Path) -> list[Row]:
    """TREC questions labelled with their coarse class (``DESC:manner How ...`` -> ``DESC``)."""
    rows = []
    for line in _read_text(path).splitlines():
        label, _, question = line.partition(" ")
        if question.strip():
            rows.append((question, label.partition(":")[0]))
    return rows


def read_sms(path: Path) -> list[Row]:
    """SMS messages labelled ``ham`` or ``spam`` (the CSV's 0/1 ``spam`` column)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return [(row["text"], "spam" if row["spam"].strip() == "1" else "ham") for row in reader if row.get("text")]


def read_conversations(root: Path, languages: Iterable[str] = LANGUAGES, min_chars: int = 15) -> list[Row]:
    """Every utterance of at least ``min_chars`` characters in the chatterbot-corpus YAML
    conversations of ``languages``, labelled with its folder's language."""
    rows = []
    for language in languages:
        folder = root / language
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no conversations for language {language!r}")
        for path in sorted(folder.glob("*.yml")):
            try:
                data = yaml.safe_load(_read_text(path)) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: invalid YAML ({' '.join(str(exc).split())[:120]})") from None
            for conversation in data.get("conversations") or []:
                for utterance in conversation or []:
                    if isinstance(utterance, str) and len(utterance.strip()) >= min_chars:
                        rows.append((utterance, language))
    return rows


def normalize(text: str) -> str:
    """The text as compared for duplicates: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def deduplicate(rows: Iterable[Row]) -> list[Row]:
    """One row per distinct text (first occurrence, whitespace tidied); texts seen with more than
    one label are dropped."""
    labels: dict[str, set[str]] = defaultdict(set)
    first: dict[str, str] = {}
    for text, label in rows:
        key = normalize(text)
        labels[key].add(label)
        first.setdefault(key, " ".join(text.split()))
    return [(first[key], next(iter(found))) for key, found in labels.items() if len(found) == 1]


def drop_small_labels(rows: list[Row], minimum: int) -> list[Row]:
    """Rows whose label has at least ``minimum`` examples."""
    counts: dict[str, int] = defaultdict(int)
    for _, label in rows:
        counts[label] += 1
    return [(text, label) for text, label in rows if counts[label] >= minimum]


def split_rows(rows: list[Row], seed: int, validation: int, test: int, train: int) -> dict[str, list[Row]]:
    """A seeded shuffle cut into test, validation and train (at most the given sizes; test and
    validation each at most a fifth of the rows, so small tasks still train on most)."""
    order = sorted(rows)  # independent of the order the source listed them in
    random.Random(seed).shuffle(order)
    n_test = min(test, len(order) // 5)
    n_validation = min(validation, len(order) // 5)
    return {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_validation],
        "train": order[n_test + n_validation :][:train],
    }


@dataclass(frozen=True)
class DemoTask:
    """How one demo task is read from the sources."""

    read: Callable[[DemoSources], list[Row]]
    """Rows (text, label) straight from the source, duplicates included."""
    min_label_examples: int = 1
    """Labels with fewer deduplicated examples are dropped."""


TASKS = {
    "sentiment": DemoTask(lambda s: read_sentiment(s.sentiment)),
    "question": DemoTask(lambda s: read_questions(s.questions)),
    "spam": DemoTask(lambda s: read_sms(s.sms)),
    "langid": DemoTask(lambda s: read_conversations(s.conversations, s.languages), min_label_examples=100),
}


def task_rows(name: str, sources: DemoSources, min_label_examples: int | None = None) -> list[Row]:
    """Task ``name``'s deduplicated rows, small labels dropped."""
    if name not in TASKS:
        raise ConfigError(f"demo: no built-in task {name!r}; built-in: {', '.join(TASKS)}")
    task = TASKS[name]
    minimum = task.min_label_examples if min_label_examples is None else min_label_examples
    return drop_small_labels(deduplicate(task.read(sources)), minimum)


def write_split_files(splits: dict[str, list[Row]], files: dict[str, str]) -> dict[str, int]:
    """Write each split as a JSON list of ``{text, label}`` to its file; returns the row counts."""
    counts = {}
    for split, path in files.items():
        if split not in splits:
            raise ConfigError(f"demo: data file for unknown split {split!r}: {path}")
        records = [{"text": text, "label": label} for text, label in splits[split]]
        # The catalog names where the data goes: each file's own folder is its root.
        write_bytes_atomic(path, json.dumps(records, ensure_ascii=False).encode(), root=Path(path).parent)
        counts[split] = len(records)
    return counts


def _read_text(path: Path) -> str:
    # The packaged files are UTF-8, but older copies of TREC's file are latin-1.
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")
