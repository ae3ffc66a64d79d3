"""Build the benchmark where its catalog points: each task's json splits, then its LoRA adapter
fine-tuned by ``lmerge fit --config configs/finetune.yaml`` (both cached)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lmerge.demo.prepare import split_rows, task_rows, write_split_files
from lmerge.demo.sources import DemoSources
from lmerge.errors import ConfigError
from lmerge.outputs import write_json_atomic
from lmerge.tasks.catalog import load_catalog
from lmerge.yaml_files import read_yaml

MANIFEST = "manifest.json"
# Beside each demo adapter: the recipe it was fine-tuned with, so a changed recipe retrains it.
RECIPE = "demo_recipe.json"


@dataclass(frozen=True)
class SplitSizes:
    """Most rows per split of every task."""

    train: int = 2400
    """Training rows (fine-tuning)."""
    validation: int = 200
    """Validation rows (supervised learners and the sweep)."""
    test: int = 300
    """Test rows (every reported number)."""


def prepare_data(
    catalog: Path, sources: DemoSources, sizes: SplitSizes, seed: int, min_label_examples: int | None = None
) -> tuple[dict[str, dict], list[str]]:
    """Write every catalog task's splits where its ``data_files`` point, unless a manifest beside
    them says they were built with these sizes and seed. Returns each task's manifest, and the
    tasks whose data was (re)written: their adapters must be trained again, since an adapter
    trained on other splits may have seen today's test rows."""
    manifests = {}
    rebuilt = []
    for name, entry in load_catalog(catalog, require_adapter=False, require_data=False).items():
        files = (entry.get("dataset") or {}).get("data_files")
        if not isinstance(files, dict) or not all(isinstance(f, str) for f in files.values()):
            raise ConfigError(f"catalog {catalog}: tasks.{name}.dataset.data_files must map each split to one file")
        manifest_path = Path(files.get("train", next(iter(files.values())))).parent / MANIFEST
        wanted = {"task": name, "seed": seed, "sizes": asdict(sizes), "files": files}
        cached = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        if {k: cached.get(k) for k in wanted} == wanted and all(Path(f).is_file() for f in files.values()):
            manifests[name] = cached
            continue
        rows = task_rows(name, sources, min_label_examples)
        splits = split_rows(rows, seed, validation=sizes.validation, test=sizes.test, train=sizes.train)
        counts = write_split_files(splits, files)
        labels = sorted({label for _, label in rows})
        manifests[name] = {**wanted, "examples": len(rows), "counts": counts, "labels": labels}
        write_json_atomic(manifest_path, manifests[name], root=manifest_path.parent)
        rebuilt.append(name)
    return manifests, rebuilt


def longest_first(manifests: dict[str, dict], tasks: list[str], catalog: Path, tokenizer: Path) -> list[str]:
    """``tasks`` in the order to fine-tune them: most tokens per training example first (each text
    cut at its task's ``max_length``). A step's time follows its batch's tokens, so with several
    fits at a time the longest start first and the last to end is a short one (the "longest
    processing time first" rule). On the demo (tokens per example: sentiment 26.6, spam 24.3,
    langid 17.4, question 13.4) this is the order of the measured fine-tuning times (228, 183, 179,
    131 s), which two at a time take 362 s, against 407 in the catalog's order."""
    from transformers import AutoTokenizer

    encode = AutoTokenizer.from_pretrained(str(tokenizer))
    entries = load_catalog(catalog, require_adapter=False)

    def tokens_per_example(task: str) -> float:
        rows = json.loads(Path(manifests[task]["files"]["train"]).read_text())
        max_length = entries[task].get("max_length")
        ids = encode([row["text"] for row in rows], truncation=max_length is not None, max_length=max_length)
        return sum(map(len, ids["input_ids"])) / max(len(rows), 1)

    return sorted(tasks, key=tokens_per_example, reverse=True)


def finetune_command(configs: Path, catalog: Path, task: str, base_model: Path, logs: Path) -> list[str]:
    """The ``lmerge fit`` arguments that fine-tune ``task``'s adapter (saved where the catalog says)."""
    return [
        "fit",
        "--config",
        str(configs / "finetune.yaml"),
        "--data.catalog",
        str(catalog),
        f"--data.tasks=[{task}]",
        "--data.tokenizer",
        str(base_model),
        "--model.init_args.base_model",
        str(base_model),
        "--trainer.default_root_dir",
        str(logs),
    ]


def recipe_digest(configs: Path) -> str:
    """The fine-tuning recipe's identity: the SHA-256 of ``configs/finetune.yaml``'s settings
    (its comments may change without retraining)."""
    settings = json.dumps(read_yaml(configs / "finetune.yaml"), sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()


def stale_adapters(catalog: Path, recipe: str) -> list[str]:
    """Catalog tasks whose adapter is not there yet, or was fine-tuned with another recipe."""
    stale = []
    for name, entry in load_catalog(catalog, require_adapter=False).items():
        adapter = Path(entry["adapter"])
        marker = adapter / RECIPE
        made_with = json.loads(marker.read_text()).get("finetune_sha256") if marker.is_file() else None
        if not (adapter / "adapter_config.json").is_file() or made_with != recipe:
            stale.append(name)
    return stale


def mark_recipe(catalog: Path, task: str, recipe: str) -> None:
    """Record beside ``task``'s freshly fine-tuned adapter the recipe it was trained with."""
    adapter = Path(load_catalog(catalog, require_adapter=False)[task]["adapter"])
    write_json_atomic(adapter / RECIPE, {"finetune_sha256": recipe}, root=adapter)
