"""Task specs: what a task's data is, how to read it, and how its labels become targets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmerge.errors import ConfigError, did_you_mean, unknown_name
from lmerge.metrics import METRICS
from lmerge.tasks.catalog import load_catalog
from lmerge.tasks.kinds import TaskKind, get_kind, kinds_that

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

SPLITS = ("train", "validation", "test")


@dataclass
class TaskSpec:
    """One task: its adapter, its data and how the data is turned into model inputs and targets."""

    name: str
    """Task name, as used in ``adapters: [...]`` and in output paths."""
    adapter: str | None = None
    """Adapter directory (absolute when read from a catalog), or None for a task with data only."""
    kind: str = "classification"
    """A kind registered in ``lmerge.tasks.kinds`` (each file there documents its own), e.g.
    ``classification`` (the adapter's own head predicts a class id) or ``label_tokens`` (a causal
    or seq2seq LM continues the prompt with the answer tokens, ``" " + label``)."""
    dataset: dict[str, Any] | None = None
    """``datasets.load_dataset`` keyword arguments, e.g. ``{path: json, data_files: {train: a.json}}``;
    None for an adapter-only entry."""
    splits: dict[str, str] | None = None
    """Our split names (train, validation, test) -> the dataset's split names. None: each of ours
    under its own name, where the dataset has it. Given: exactly the listed ones, which must exist."""
    text_column: str = "text"
    """Column holding the input text."""
    label_column: str = "label"
    """Column holding the label: a name from ``label_names``, an integer class id, or (for
    ``label_tokens`` without ``label_names``) the answer text itself."""
    label_names: list[str] | None = None
    """Class names in class-id order; names in the data map to their index."""
    metric: str | None = None
    """Primary metric: ``accuracy``, ``macro_f1``; for text answers also ``wer`` (lower is better),
    ``exact_match`` and ``contains`` (normalized answers, ``lmerge.metrics``). Default: the kind's
    (``accuracy``; ``exact_match`` for ``generation``)."""
    max_length: int = 128
    """Most tokens per example (prompt and answer together for kinds with text answers)."""
    prompt: str | None = None
    """For kinds with text answers (``label_tokens``) only: template whose ``{text}`` is replaced
    by the input text, e.g. ``"Review: {text}\\nSentiment:"``. None: the text alone is the prompt."""
    generation: dict[str, Any] | None = None
    """For kinds that generate their answers (``generation``) only: decoding and answer extraction,
    e.g. ``{max_new_tokens: 32, stop: ["\\n"], answer_pattern: "(-?[\\d.,]*\\d)"}`` (the kind's file
    documents each key)."""
    pooling: str = "model"
    """For kinds with task heads (``classification``) only: how a sequence becomes the one vector
    its head reads. ``mean`` (attention-masked mean of the last hidden state) and ``last`` (last
    non-padding token, for decoder LMs) use a head saved beside a plain LoRA adapter; ``cls`` the
    model's own sequence-classification class; ``model`` what the adapter's head was trained with,
    and for a new head the base model's own (a sentence-transformers model's pooling, else ``cls``)."""
    task_kind: TaskKind = field(init=False, repr=False, compare=False)
    """The registered kind named by ``kind``, as this task uses it (e.g. with its pooling): everything
    that depends on it."""

    def __post_init__(self) -> None:
        where = f"task {self.name}"
        try:
            self.task_kind = get_kind(self.kind)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        self.metric = self.metric or self.task_kind.default_metric
        if self.metric not in METRICS:
            raise ConfigError(f"{where}: {unknown_name('metric', self.metric, list(METRICS))}")
        if METRICS[self.metric].on_text and not self.task_kind.text_answers:
            raise ConfigError(
                f"{where}: metric {self.metric!r} needs kind {kinds_that(lambda k: k.text_answers)} (text answers)"
            )
        if self.generation is not None and not self.task_kind.generates:
            raise ConfigError(f"{where}: generation is for kind {kinds_that(lambda k: k.generates)} only")
        if self.pooling != "model" and not self.task_kind.has_head:
            raise ConfigError(f"{where}: pooling is for kind {kinds_that(lambda k: k.has_head)} only")
        self.task_kind.check(self, where)
        self.task_kind = self.task_kind.resolve(self)
        if self.prompt is not None:
            if not self.task_kind.text_answers:
                raise ConfigError(f"{where}: prompt is for kind {kinds_that(lambda k: k.text_answers)} only")
            if "{text}" not in self.prompt:
                raise ConfigError(f"{where}: prompt must contain '{{text}}', got {self.prompt!r}")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 2:
            raise ConfigError(f"{where}: max_length must be an integer >= 2, got {self.max_length!r}")
        if self.label_names is not None:
            names = self.label_names
            if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise ConfigError(f"{where}: label_names must be distinct non-empty strings, got {names!r}")
        if self.splits is not None:
            if not isinstance(self.splits, dict) or not all(isinstance(v, str) for v in self.splits.values()):
                raise ConfigError(f"{where}: splits must map train/validation/test to dataset split names")
            for ours in self.splits:
                if ours not in SPLITS:
                    raise ConfigError(f"{where}: {unknown_name('split', ours, list(SPLITS))}")
        if self.dataset is not None:
            if not isinstance(self.dataset, dict) or not isinstance(self.dataset.get("path"), str):
                raise ConfigError(f"{where}: dataset must be load_dataset arguments with a 'path'")
            if "split" in self.dataset:
                raise ConfigError(f"{where}: dataset.split is not allowed; map split names with 'splits'")

    def load_split(self, split: str) -> Dataset:
        """The rows of our ``split`` (train, validation or test), with the columns checked."""
        if self.dataset is None:
            raise ConfigError(f"task {self.name}: no dataset in the catalog entry")
        return select_split(
            load_task_dataset(self.name, self.dataset),
            task=self.name,
            split=split,
            splits=self.splits,
            columns=[self.text_column, self.label_column],
            dataset=self.dataset,
        )

    def encode_labels(self, values: Sequence[Any], split: str) -> list[int | str]:
        """The split's labels as class ids (or answer texts); see :func:`encode_labels`."""
        return encode_labels(values, task=self.name, split=split, kind=self.task_kind, label_names=self.label_names)


_FIELDS = tuple(f.name for f in fields(TaskSpec) if f.init and f.name != "name")


def load_task_catalog(path: str | Path) -> dict[str, TaskSpec]:
    """Task name -> TaskSpec for every entry under ``tasks:`` of the catalog at ``path``.

    The shorthand ``name: adapter/path`` gives a spec with no dataset; relative adapter and data
    paths are resolved against the catalog's directory.
    """
    specs: dict[str, TaskSpec] = {}
    for name, entry in load_catalog(path, require_adapter=False).items():
        unknown = sorted(set(entry) - set(_FIELDS))
        if unknown:
            hint = did_you_mean(unknown[0], _FIELDS)
            raise ConfigError(
                f"catalog {path}: tasks.{name}: unknown key {unknown[0]!r}{hint}; valid: {', '.join(_FIELDS)}"
            )
        if entry["adapter"] is None and "dataset" not in entry:
            raise ConfigError(f"catalog {path}: tasks.{name} needs an adapter, a dataset or both")
        try:
            specs[name] = TaskSpec(name=name, **entry)
        except ConfigError as exc:
            raise ConfigError(f"catalog {path}: {exc}") from None
    return specs


def load_task_dataset(task: str, dataset: Mapping[str, Any]) -> DatasetDict:
    """``datasets.load_dataset(**dataset)`` with every split, failures turned into ConfigError."""
    import datasets

    files = dataset.get("data_files")
    if isinstance(files, dict) and len(files) > 1:
        # One load per split: a single load casts every split to the first one's column types,
        # so integer ids in a test file would arrive as strings when the train file has names.
        parts = {name: _load(task, {**dataset, "data_files": {name: f}})[name] for name, f in files.items()}
        return datasets.DatasetDict(parts)
    return _load(task, dataset)


def _load(task: str, dataset: Mapping[str, Any]) -> DatasetDict:
    import datasets
    from datasets.exceptions import DatasetsError

    datasets.disable_progress_bars()  # its bars would bury the one-line errors
    try:
        data = datasets.load_dataset(**dataset)
    except (OSError, ValueError, DatasetsError) as exc:
        # DatasetGenerationError says only "an error occurred"; the reason is its cause.
        reason = exc.__cause__ if isinstance(exc, DatasetsError) and exc.__cause__ else exc
        raise ConfigError(f"task {task}: cannot load dataset {dataset.get('path')!r} ({_one_line(reason)})") from None
    if not isinstance(data, datasets.DatasetDict):
        raise ConfigError(f"task {task}: dataset {dataset.get('path')!r} must load as named splits")
    return data


def select_split(
    data: DatasetDict,
    *,
    task: str,
    split: str,
    splits: Mapping[str, str] | None,
    columns: Sequence[str],
    dataset: Mapping[str, Any],
) -> Dataset:
    """Our ``split`` of ``data`` through the ``splits`` mapping, checked to have ``columns``."""
    name = dataset_split(split, splits, list(data))
    if name is None:
        have = ", ".join(available_splits(splits, list(data))) or "none"
        raise ConfigError(f"task {task}: no {split!r} split (available: {have})")
    if name not in data:
        raise ConfigError(f"task {task}: splits.{split} is {name!r}, not a dataset split; have {', '.join(data)}")
    rows = data[name]
    for column in columns:
        if column not in rows.column_names:
            raise ConfigError(
                f"task {task}: {_describe(dataset, split, name)} has no column {column!r}; "
                f"columns: {', '.join(rows.column_names)}"
            )
    return rows


def dataset_split(split: str, splits: Mapping[str, str] | None, present: Sequence[str]) -> str | None:
    """The dataset's name for our ``split``, or None when the task has no such split."""
    if split not in SPLITS:
        raise ConfigError(unknown_name("split", split, list(SPLITS)))
    if splits is None:
        return split if split in present else None
    return splits.get(split)


def available_splits(splits: Mapping[str, str] | None, present: Sequence[str]) -> list[str]:
    """Our split names that the task has (mapped explicitly, or present under their own name)."""
    return [s for s in SPLITS if dataset_split(s, splits, present) is not None]


def encode_labels(
    values: Sequence[Any],
    *,
    task: str,
    split: str,
    kind: TaskKind,
    label_names: Sequence[str] | None,
) -> list[int | str]:
    """Class ids for ``values`` (names through ``label_names``, or integer ids), or, for a kind
    with text answers without ``label_names``, the answer texts. A label that fits neither is an
    error naming the task, split, row and value."""
    index = {name: i for i, name in enumerate(label_names)} if label_names else None
    out: list[int | str] = []
    for row, value in enumerate(values):
        is_id = isinstance(value, int) and not isinstance(value, bool)
        if index is not None:
            if isinstance(value, str) and value in index:
                out.append(index[value])
                continue
            if is_id and 0 <= value < len(index):
                out.append(value)
                continue
            expected = f"one of label_names ({', '.join(index)}) or an id below {len(index)}"
        elif not kind.text_answers:
            if is_id and value >= 0:
                out.append(value)
                continue
            expected = "a non-negative integer class id (or give label_names to use names)"
        else:
            if isinstance(value, str) or is_id:
                out.append(str(value))
                continue
            expected = "an answer text"
        raise ConfigError(f"task {task}: split {split}, row {row}: unknown label {value!r}; expected {expected}")
    return out


def _describe(dataset: Mapping[str, Any], split: str, name: str) -> str:
    """'file X (split S)' when the split comes from known data files, else 'split S'."""
    files = dataset.get("data_files")
    if isinstance(files, dict):
        files = files.get(name)
    elif name != "train":
        # A bare data_files string or list is always the 'train' split of load_dataset.
        files = None
    if isinstance(files, list):
        files = ", ".join(files)
    where = f"split {split}" if split == name else f"split {split} (dataset split {name!r})"
    return f"file {files} ({where})" if files else where


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def catalog_tasks(catalog: str | Path | None, names: list[str], key: str = "eval_tasks") -> list[TaskSpec]:
    """The catalog's specs of ``names``, in order; an unknown name is one clear error that starts
    with ``key`` (the setting that lists the names)."""
    if not catalog:
        raise ConfigError(f"{key}: evaluation needs a task catalog (--catalog path/to/catalog.yaml)")
    specs = load_task_catalog(catalog)
    missing = [name for name in names if name not in specs]
    if missing:
        raise ConfigError(f"{key}: {missing[0]!r} is not a task in catalog {catalog}{did_you_mean(missing[0], specs)}")
    return [specs[name] for name in names]
