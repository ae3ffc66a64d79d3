"""Label-frequency sampling for training loaders, and the ``sampling`` config that picks it per task.

```yaml
sampling:
  default: {enabled: true, strategy: sqrt_inverse}
  per_task:
    intent: {strategy: balanced}
    asr: {enabled: false}
```
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from lmerge.errors import ConfigError, unknown_name

# Weight of an example from its label's count and the number of classes.
_WEIGHTS = {
    "uniform": lambda count, classes: torch.ones_like(count),
    "inverse": lambda count, classes: 1.0 / count,
    "sqrt_inverse": lambda count, classes: 1.0 / count.sqrt(),
    "balanced": lambda count, classes: 1.0 / (classes * count),
    "none": lambda count, classes: torch.ones_like(count),
}
STRATEGIES = tuple(_WEIGHTS)
_KEYS = ("enabled", "strategy")
# Batches per run of draws that grouping by length sorts (the megabatch of Hugging Face's
# LengthGroupedSampler): long enough that a batch's examples are close in length, short enough
# that a run still mixes a good share of the split.
_GROUP_BATCHES = 50


def sampling_weights(labels: Sequence[Hashable], strategy: str) -> torch.Tensor:
    """One float64 weight per example, from how often its label occurs (``count(y)``):

    - ``none`` and ``uniform``: 1 for every example (uniform over examples);
    - ``inverse``: ``1 / count(y)``, so every class is drawn equally often;
    - ``sqrt_inverse``: ``1 / sqrt(count(y))``, between uniform and inverse;
    - ``balanced``: ``1 / (n_classes * count(y))``: each class holds total mass ``1 / n_classes``
      and the weights sum to 1 (draws as ``inverse`` does; the scale differs).
    """
    if strategy not in _WEIGHTS:
        raise ConfigError(unknown_name("sampling strategy", strategy, list(STRATEGIES)))
    counts = Counter(labels)
    count = torch.tensor([counts[y] for y in labels], dtype=torch.float64)
    return _WEIGHTS[strategy](count, len(counts))


class EpochSampler(Sampler[int]):
    """Indices in an order drawn from ``seed + epoch``: a random permutation, or, with
    ``weights``, ``num_samples`` draws with replacement. Lightning calls ``set_epoch`` at
    each epoch, so a run resumed from a checkpoint sees the same batches as one that was not.

    Under distributed training each process takes every ``world_size``-th index of that one
    order (wrapped to equal length), so N processes with batch b see, step by step, the same
    examples as one process with batch N*b; the trainer must then not wrap it in its own
    DistributedSampler (``use_distributed_sampler: false``, the default of ``lmerge fit``).

    With ``lengths`` (one per example) and ``batch_size``, the order is grouped by length: every
    run of 50 batches' draws is sorted by length and cut into batches, which are then shuffled
    within the run (a trailing partial batch stays last). Batches then hold examples of similar
    length and pad little, while each example is still drawn as often as without grouping."""

    def __init__(
        self,
        size: int,
        seed: int = 0,
        weights: torch.Tensor | None = None,
        num_samples: int | None = None,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
    ):
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"EpochSampler: {len(lengths)} lengths for {size} examples")
        self.size = size
        self.seed = seed
        self.weights = weights
        self.num_samples = num_samples or size
        self.lengths = lengths
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_next_at(self, position: int) -> None:
        """Let the next pass begin at ``position`` of this process's order (then passes are whole again)."""
        self.start = position

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = torch.multinomial(self.weights, self.num_samples, True, generator=generator).tolist()
        rank, world = _process_group()
        if self.lengths is not None:
            # Grouped on the global batch: each process's share of it is then of similar lengths too.
            order = self._grouped(order, self.batch_size * world, generator)
        if world > 1:
            order = (order * world)[: len(self) * world][rank::world]
        start, self.start = self.start, 0
        return iter(order[start:])

    def _grouped(self, order: list[int], batch: int, generator: torch.Generator) -> list[int]:
        grouped: list[int] = []
        span = batch * _GROUP_BATCHES
        for begin in range(0, len(order), span):
            run = sorted(order[begin : begin + span], key=self.lengths.__getitem__)
            full = len(run) // batch
            for index in torch.randperm(full, generator=generator).tolist():
                grouped += run[index * batch : (index + 1) * batch]
            grouped += run[full * batch :]
        return grouped

    def __len__(self) -> int:
        total = self.size if self.weights is None else self.num_samples
        world = _process_group()[1]
        return -(-total // world)


class ResumableLoader(DataLoader):
    """A training DataLoader over an :class:`EpochSampler` that Lightning checkpoints mid-epoch
    (it saves and restores iterables with ``state_dict``/``load_state_dict``): the state is the
    sampler's epoch and the batches the current pass has handed out. After ``load_state_dict``,
    a pass of the same epoch resumes after those batches (their examples are never loaded), so
    a run killed mid-epoch and resumed sees the batches an uninterrupted run sees."""

    def __init__(self, dataset: Sequence[Any], sampler: EpochSampler, **options: Any) -> None:
        super().__init__(dataset, sampler=sampler, **options)
        self._served = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: the resume point is read when the first batch is asked for, after Lightning
        # has set the epoch and loaded the state (it creates the iterator before either).
        resume, self._resume = self._resume, None
        self._served = 0
        if resume is not None and resume["epoch"] == self.sampler.epoch:
            self._served = resume["batches"]
            self.sampler.start_next_at(self._served * self.batch_size)
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many batches of it this loader's current pass has given."""
        return {"epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the next pass after ``state_dict["batches"]`` batches if it is of the same epoch."""
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_sampler(
    labels: Sequence[Hashable],
    strategy: str,
    seed: int = 0,
    num_samples: int | None = None,
    lengths: Sequence[int] | None = None,
    batch_size: int = 1,
) -> EpochSampler:
    """A seeded, epoch-aware sampler: by :func:`sampling_weights` with replacement
    (``num_samples`` draws, default one epoch's worth), or a plain shuffle for ``none``; grouped
    into batches of ``batch_size`` by ``lengths`` when given (see :class:`EpochSampler`)."""
    weights = sampling_weights(labels, strategy)
    if not len(weights):
        raise ConfigError(f"sampling {strategy!r}: the training split is empty")
    drawn = None if strategy == "none" else weights
    return EpochSampler(len(weights), seed, drawn, num_samples, lengths, batch_size)


def sampling_strategy(config: Mapping[str, Any] | None, task: str) -> str:
    """The strategy for ``task`` from a ``sampling`` config; ``none`` when sampling is off for it.

    ``per_task.<task>`` overrides ``default`` key by key. Within either block, naming a
    ``strategy`` without ``enabled`` means enabled; ``enabled: true`` needs a strategy from one
    of the two blocks. No config, or neither block enabled, gives ``none``.
    """
    if config is None:
        return "none"
    if not isinstance(config, Mapping):
        raise ConfigError(f"sampling: expected a mapping with default/per_task, got {config!r}")
    extra = sorted(set(config) - {"default", "per_task"})
    if extra:
        raise ConfigError(f"sampling: unknown key {extra[0]!r}; valid: default, per_task")
    per_task = config.get("per_task") or {}
    if not isinstance(per_task, Mapping):
        raise ConfigError("sampling.per_task: expected a mapping of task name -> {enabled, strategy}")
    # Check every task's block, not only this one's, so a typo fails whichever task asks first.
    blocks = {name: _block(block, f"sampling.per_task.{name}") for name, block in per_task.items()}
    merged = {**_block(config.get("default"), "sampling.default"), **blocks.get(task, {})}
    if not merged.get("enabled", False):
        return "none"
    if "strategy" not in merged:
        raise ConfigError(f"sampling: enabled for task {task} but no strategy (one of {', '.join(STRATEGIES)})")
    return merged["strategy"]


def _block(block: Any, where: str) -> dict[str, Any]:
    """A checked ``{enabled, strategy}`` block, with ``enabled`` implied by a named strategy."""
    if block is None:
        return {}
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}: expected a mapping with enabled/strategy, got {block!r}")
    extra = sorted(set(block) - set(_KEYS))
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r}; valid: {', '.join(_KEYS)}")
    out = dict(block)
    if "enabled" in out and not isinstance(out["enabled"], bool):
        raise ConfigError(f"{where}.enabled: expected true or false, got {out['enabled']!r}")
    if "strategy" in out:
        if out["strategy"] not in STRATEGIES:
            raise ConfigError(f"{where}.strategy: {unknown_name('strategy', out['strategy'], list(STRATEGIES))}")
        out.setdefault("enabled", True)
    return out
