"""``lmerge fit|validate|test``: LightningCLI over any learner and the catalog DataModule."""

from __future__ import annotations

import logging
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmerge.errors import ConfigError
from lmerge.yaml_files import read_yaml

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI


LIGHTNING_VERBS = ("fit", "validate", "test")


def lightning(argv: list[str], verbose: bool = False) -> LightningCLI:
    """``lmerge fit|validate|test``: LightningCLI over any learner (``model.class_path``) and the
    catalog DataModule, with the coefficient logger, the merge export and the distillation targets'
    cache (``lmerge.callbacks.TeacherCache``, in the export's output folder) always on; the model
    summary only when ``verbose`` (or asked for with ``--trainer.enable_model_summary``). Returns
    the CLI (``cli.trainer`` holds the callbacks, e.g. where the export wrote)."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lmerge.callbacks import THREADS_FILE_ENV, CoefficientLogger, MergeExport, TeacherCache, ThreadBudget
    from lmerge.data import CatalogDataModule

    class LMergeCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
            parser.add_lightning_class_args(CoefficientLogger, "coefficient_logger")
            parser.add_lightning_class_args(MergeExport, "export")
            parser.link_arguments("data.catalog", "model.init_args.catalog")
            parser.link_arguments("data.tasks", "model.init_args.tasks")
            parser.link_arguments("data.catalog", "export.catalog")
            parser.add_lightning_class_args(TeacherCache, "teacher_cache")
            parser.link_arguments("export.output_dir", "teacher_cache.output_dir")

        def parse_arguments(self, parser, args) -> None:  # noqa: ANN001
            super().parse_arguments(parser, args)
            # Before Lightning reads the checkpoint's hyperparameters and the model, data and
            # trainer are built, so a bad checkpoint costs no loading.
            if self.config.get("subcommand"):
                _check_checkpoint_args(self.config[self.config.subcommand])
                _check_scheduler_args(self.config[self.config.subcommand])

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            try:
                trainer = super().instantiate_trainer(**kwargs)
            except ValueError as exc:
                # Lightning's refusal of a combination of settings (``strategy fsdp`` on a CPU, ...).
                raise ConfigError(f"trainer: {' '.join(str(exc).split())}") from None
            if os.environ.get(THREADS_FILE_ENV):
                trainer.callbacks.append(ThreadBudget(os.environ[THREADS_FILE_ENV]))
            return trainer

    _check_config_files(argv)
    # The warning says args= and sys.argv both hold arguments, which is how lmerge always calls it.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # The seed is 0 unless --seed_everything says otherwise; its "Seed set" line would precede any error.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    try:
        return LMergeCLI(
            LightningModule,
            CatalogDataModule,
            subclass_mode_model=True,
            args=argv,
            parser_kwargs={"exit_on_error": False},
            # The DataModules' samplers shard themselves across processes (lmerge.data.sampling.EpochSampler).
            trainer_defaults={"use_distributed_sampler": False, "enable_model_summary": verbose},
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
        )
    except (MisconfigurationException, ModuleNotFoundError) as exc:
        # Lightning's refusals of a trainer setting (an accelerator this machine lacks, ...).
        raise ConfigError(f"trainer: {' '.join(str(exc).split())}") from None
    except pickle.UnpicklingError as exc:
        # torch's weights-only loader met a pickled object that could run code: refused, never run.
        paragraphs = [" ".join(p.split()) for p in str(exc).split("\n\n") if p.strip()]
        reason = paragraphs[1] if len(paragraphs) > 1 else paragraphs[0]
        raise ConfigError(f"ckpt_path: checkpoint refused, it holds pickled code ({reason})") from None


def _check_config_files(argv: list[str]) -> None:
    """Read every ``--config`` file strictly first (duplicate keys, alias bombs and deep nesting
    refused, naming the file); jsonargparse reads them again for their values."""
    args = iter(argv)
    for arg in args:
        name, equals, value = arg.partition("=")
        if name == "--config":
            read_yaml(value if equals else next(args, ""))


def _check_checkpoint_args(settings: Any) -> None:
    """A ``ckpt_path`` that names a file must exist and be a whole PyTorch checkpoint (a zip
    archive whose members are intact); checkpoints load with ``weights_only`` (no pickled code
    runs) unless the user asks otherwise."""
    path = settings.get("ckpt_path")
    keywords = ("last", "best", "hpc", "registry")
    if path and not str(path).startswith(keywords) and "://" not in str(path):
        if not Path(path).is_file():
            raise ConfigError(f"ckpt_path {path}: checkpoint file does not exist")
        _check_checkpoint_file(Path(path))
    if settings.get("weights_only") is None:
        settings["weights_only"] = True


def _check_scheduler_args(settings: Any) -> None:
    """Lightning applies ``lr_scheduler`` only together with ``optimizer`` (which then replaces the
    learner's own Adam) and drops it without a word otherwise: refused here instead."""
    if settings.get("lr_scheduler") and not settings.get("optimizer"):
        raise ConfigError(
            "lr_scheduler: Lightning applies it only with an optimizer given too (e.g. --optimizer Adam "
            "--optimizer.lr 0.01, which replaces the learner's own Adam and its model.lr); alone it would be ignored"
        )


def _check_checkpoint_file(path: Path) -> None:
    """Refuse a file that torch could not load as a checkpoint (truncated, damaged, not one)
    before any model is built: torch saves checkpoints as zip archives with a ``data.pkl``."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ConfigError(f"ckpt_path {path}: not a readable PyTorch checkpoint ({exc})") from None
    if damaged is not None:
        raise ConfigError(f"ckpt_path {path}: damaged checkpoint (member {damaged} fails its checksum)")
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise ConfigError(f"ckpt_path {path}: not a PyTorch checkpoint (no data.pkl in the archive)")
