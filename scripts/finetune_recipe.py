"""Choose the demo's fine-tuning learning rate on the validation split.

    .venv/bin/python scripts/finetune_recipe.py --lr 5e-4 1e-3 2e-3 [--tasks sentiment ...]
        [--out artifacts/recipe] [--max-steps 300]

Runs ``lmerge fit --config configs/finetune.yaml`` (its early stopping and best-checkpoint restore
on the validation loss) for every learning rate and task, each in its own process, with the
adapters written under ``--out/lr_<lr>/<task>`` (the demo's data must exist: run ``lmerge demo``
once, or its data step). Then, per run: the step of the best validation loss, that loss, the
adapter's primary metric on the validation split, the task vector's size relative to the base
weights, and the CPU seconds of the fit. The test split is never read. The table's last lines
give each learning rate's mean validation metric, what the demo's recipe is chosen by.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
CATALOG = CONFIGS / "demo" / "catalog.yaml"
BASE_MODEL = ROOT / "artifacts" / "demo" / "base_model"


def fit(task: str, lr: float, adapter: Path, logs: Path, max_steps: int) -> float:
    """Fine-tune ``task``'s adapter into ``adapter``; returns the fit's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, "-m", "lmerge", "fit", "--config", str(CONFIGS / "finetune.yaml")]
    command += ["--data.catalog", str(CATALOG), f"--data.tasks=[{task}]", "--data.tokenizer", str(BASE_MODEL)]
    command += ["--model.init_args.base_model", str(BASE_MODEL), "--model.init_args.lr", str(lr)]
    command += ["--model.init_args.output_dir", str(adapter), "--trainer.default_root_dir", str(logs)]
    command += ["--trainer.max_steps", str(max_steps), "--trainer.enable_model_summary", "false"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def best_checkpoint(logs: Path) -> tuple[int, float]:
    """The step and validation loss of the run's best checkpoint (ModelCheckpoint keeps one)."""
    [version] = sorted((logs / "lightning_logs").iterdir())[-1:]
    [checkpoint] = (version / "checkpoints").glob("*.ckpt")
    step = int(re.search(r"step=(\d+)", checkpoint.name).group(1))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    callback = next(v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    return step, float(callback["best_model_score"])


def validation_score(task: str, adapter: Path, root: Path) -> float:
    """The adapter's primary metric on the validation split, through lmerge's evaluation."""
    from lmerge.evaluation.evaluate import Evaluator
    from lmerge.tasks.spec import catalog_tasks

    catalog = yaml.safe_load(CATALOG.read_text())
    catalog["tasks"] = {task: {**catalog["tasks"][task], "adapter": str(adapter)}}
    for split, file in catalog["tasks"][task]["dataset"]["data_files"].items():
        catalog["tasks"][task]["dataset"]["data_files"][split] = str((CATALOG.parent / file).resolve())
    path = root / f"catalog_{task}.yaml"
    path.write_text(yaml.safe_dump(catalog))
    [spec] = catalog_tasks(str(path), [task])
    evaluator = Evaluator([spec], "validation", output_root=root / "eval", base_model=str(BASE_MODEL))
    return float(evaluator.baseline(spec)["value"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--tasks", nargs="+", default=list(yaml.safe_load(CATALOG.read_text())["tasks"]))
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "recipe")
    parser.add_argument("--max-steps", type=int, default=300)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from lmerge.adapters.lora import LoraAdapter
    from lmerge.evaluation.task_vectors import task_vector_stats

    rows = []
    print("| lr | task | best step | val loss | val metric | task vector size | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for lr in args.lr:
        for task in args.tasks:
            run = args.out / f"lr_{lr:g}"
            adapter, logs = run / task, run / "logs" / task
            if not (adapter / "adapter_config.json").is_file():
                cpu = fit(task, lr, adapter, logs, args.max_steps)
            else:
                cpu = float("nan")  # trained by an earlier run of this script
            step, loss = best_checkpoint(logs)
            with tempfile.TemporaryDirectory() as scratch:
                metric = validation_score(task, adapter, Path(scratch))
            size = task_vector_stats([LoraAdapter(adapter, name=task)], BASE_MODEL).relative_sizes()[0]
            rows.append((lr, task, metric))
            print(f"| {lr:g} | {task} | {step} | {loss:.4f} | {metric:.4f} | {size:.3f} | {cpu:.0f} |", flush=True)
    print()
    for lr in args.lr:
        scores = [metric for rate, _, metric in rows if rate == lr]
        print(f"lr {lr:g}: mean validation metric {sum(scores) / len(scores):.4f}")


if __name__ == "__main__":
    main()
