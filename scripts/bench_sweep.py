"""Benchmark how many evaluations a bayes sweep needs to come within 0.5 points of the grid's best
score, against the grid's count, on a 1-D and a 2-D space.

    .venv/bin/python scripts/bench_sweep.py [--examples 400] [--seeds 5] [--out results.json]

A tiny random BERT (hidden 32, 2 layers, 3 labels) and a WordPiece tokenizer over random words
are generated in a temporary directory, with two tasks: in each, a text's class is told by one of
the task's own keywords among random filler words. Each task's PEFT LoRA adapter (r=4 on query
and value, over a fixed random classifier head, so that the task lives in the task vector) is
trained for a few hundred steps on CPU; the sweeps then look for the merge that loses least on its
worse task on ``--examples`` test texts per task.

- 1-D: ``weighted_delta`` over ``lambda``: a grid of 21 values in [0, 1], bayes over [0, 1].
- 2-D: ``ties`` over ``k`` and ``lambda``: a 7 x 7 grid (k 10..100, lambda 0.5..2.0), bayes over
  the same box; once with k on a log scale (grid values and bayes range alike: the best points of
  these tasks lie at small k), once linear.

The score is lmerge's sweep score, the minimum interference delta over the two tasks (accuracy,
so 0.5 points is 0.005). For each of ``--seeds`` seeds a bayes sweep runs ``budget`` evaluations
(half the grid's count); the table gives, per seed, the number of evaluations after which the
best score so far is within 0.5 points of the grid's best (``-`` if never within the budget),
their median, and that median over the grid's count (target: at most 1/3).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lmerge.sweep import SweepConfig, run_sweep

LABELS = ["red", "green", "blue"]
TARGETS = ["query", "value"]
WITHIN = 0.005  # 0.5 points of accuracy
KEYWORDS = 4  # keywords per class and task
TRAIN_STEPS = 400  # AdamW steps of batch 32 per adapter
SPACES: dict[str, dict[str, Any]] = {
    "1-D weighted_delta lambda": {
        "method": "weighted_delta",
        "grid": {"lambda": [round(0.05 * i, 2) for i in range(21)]},
        "space": {"lambda": {"type": "float", "min": 0.0, "max": 1.0}},
        "init_points": 3,
    },
    "2-D ties log k x lambda": {
        "method": "ties",
        "grid": {"k": [10, 15, 22, 32, 46, 68, 100], "lambda": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]},
        "space": {
            "k": {"type": "float", "min": 10, "max": 100, "log": True},
            "lambda": {"type": "float", "min": 0.5, "max": 2.0},
        },
        "init_points": 5,
    },
    "2-D ties linear k x lambda": {
        "method": "ties",
        "grid": {"k": [10, 25, 40, 55, 70, 85, 100], "lambda": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]},
        "space": {"k": {"type": "float", "min": 10, "max": 100}, "lambda": {"type": "float", "min": 0.5, "max": 2.0}},
        "init_points": 5,
    },
}


def generate(root: Path, examples: int) -> Path:
    """Base model, tokenizer, two trained adapters and their test data; returns the catalog."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BertConfig, BertTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6))) for _ in range(300)})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(specials + words)})
    tokenizer.save_pretrained(root / "base")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(LABELS),
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "base")
    shuffled = rng.sample(words, len(words))
    filler = shuffled[2 * len(LABELS) * KEYWORDS :]
    tasks = {}
    for i, name in enumerate(("first", "second")):
        # Each task's class is told by one of its own keywords, hidden among filler words.
        first = i * len(LABELS) * KEYWORDS
        keywords = [shuffled[first + c * KEYWORDS : first + (c + 1) * KEYWORDS] for c in range(len(LABELS))]

        def rows(count: int, keywords: list[list[str]] = keywords) -> list[dict[str, str]]:
            out = []
            for _ in range(count):
                label = rng.randrange(len(LABELS))
                text = rng.choices(filler, k=rng.randint(3, 10))
                text.insert(rng.randrange(len(text) + 1), rng.choice(keywords[label]))
                out.append({"text": " ".join(text), "label": LABELS[label]})
            return out

        train, test = rows(1000), rows(examples)
        model = AutoModelForSequenceClassification.from_pretrained(root / "base")
        wrapped = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=TARGETS))
        generator = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for key, param in wrapped.named_parameters():
                if "modules_to_save" in key:
                    # A fixed random head: only the LoRA factors learn, so the task lives in the task vector.
                    param.copy_(torch.randn(param.shape, generator=generator) * (0.0 if key.endswith("bias") else 3.0))
                    param.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
        wrapped.train()
        for _ in range(TRAIN_STEPS):
            batch = rng.sample(train, 32)
            inputs = tokenizer([r["text"] for r in batch], return_tensors="pt", padding=True)
            labels = torch.tensor([LABELS.index(r["label"]) for r in batch])
            loss = torch.nn.functional.cross_entropy(wrapped(**inputs).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        wrapped.save_pretrained(root / name)
        (root / f"{name}.json").write_text(json.dumps(test))
        tasks[name] = {
            "adapter": str(root / name),
            "dataset": {"path": "json", "data_files": {"test": str(root / f"{name}.json")}},
            "label_names": LABELS,
        }
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": tasks}))
    return catalog


def sweep(catalog: Path, out: Path, method: str, search: dict[str, Any]) -> list[dict[str, Any]]:
    config = SweepConfig(
        adapters=["first", "second"],
        catalog=str(catalog),
        method=method,
        output_dir=str(out),
        eval_batch_size=128,
        search=search,
    )
    return sorted(run_sweep(config, progress=False).points, key=lambda p: p["trial"])


def evaluations_to_reach(points: list[dict[str, Any]], target: float) -> int | None:
    best = float("-inf")
    for count, point in enumerate(points, 1):
        best = max(best, point["score"])
        if best >= target:
            return count
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400, help="test examples per task")
    parser.add_argument("--seeds", type=int, default=5, help="bayes sweeps per space")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalog = generate(root, args.examples)
        for label, spec in SPACES.items():
            started = time.perf_counter()
            grid = sweep(
                catalog, root / "grid" / spec["method"], spec["method"], {"type": "grid", "grid": spec["grid"]}
            )
            grid_seconds = time.perf_counter() - started
            grid_best = max(p["score"] for p in grid)
            budget = len(grid) // 2
            needed, bayes_best = [], []
            for seed in range(args.seeds):
                search = {"type": "bayes", "budget": budget, "init_points": spec["init_points"], "seed": seed}
                points = sweep(
                    catalog, root / f"bayes{seed}" / spec["method"], spec["method"], {**search, "space": spec["space"]}
                )
                needed.append(evaluations_to_reach(points, grid_best - WITHIN))
                bayes_best.append(max(p["score"] for p in points))
            reached = [n if n is not None else budget + 1 for n in needed]
            median = statistics.median(reached)
            results.append(
                {
                    "space": label,
                    "grid_evaluations": len(grid),
                    "grid_best": grid_best,
                    "grid_seconds": round(grid_seconds, 1),
                    "budget": budget,
                    "bayes_needed": needed,
                    "bayes_best": bayes_best,
                    "median_needed": median,
                    "ratio": median / len(grid),
                }
            )
            print(f"done: {label}", file=sys.stderr)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def table(results: list[dict[str, Any]]) -> str:
    header = ["space", "grid evals", "grid best", "bayes evals to within 0.5 pt (per seed)", "median", "median/grid"]
    rows = [header]
    for r in results:
        per_seed = " ".join("-" if n is None else str(n) for n in r["bayes_needed"])
        rows.append(
            [
                r["space"],
                str(r["grid_evaluations"]),
                f"{r['grid_best']:+.4f}",
                per_seed,
                f"{r['median_needed']:g}",
                f"{r['ratio']:.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
