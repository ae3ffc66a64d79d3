"""Coefficient learners: each runs on tiny models and data, moves its coefficients the right way,
logs to TensorBoard, and exports a merge spec that ``lmerge merge`` reproduces exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lmerge.data import CatalogDataModule
from lmerge.errors import ConfigError
from lmerge.learn import AdaMerging, GradientCE, RegretSmoothMax, SuperMerge
from lmerge.learn.base import resolve_model_dtype
from lmerge.learn.callbacks import BestCoefficients, CoefficientLogger
from lmerge.pipeline import export_learned_merge

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def fit(learner, data, steps, tmp_path, **trainer_options):
    seed_everything(0, workers=True)
    trainer = Trainer(
        max_steps=steps,
        logger=TensorBoardLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
        **trainer_options,
    )
    trainer.fit(learner, datamodule=data)
    return trainer


def data_for(tasks, fit_split, names=("alpha", "beta"), **options):
    return CatalogDataModule(str(tasks), list(names), fit_split=fit_split, batch_size=4, **options)


LEARNERS = [
    (AdaMerging, "test", {"lr": 0.05}),
    (GradientCE, "validation", {"ce_baseline_batches": 2}),
    (SuperMerge, "validation", {}),
    (SuperMerge, "train", {"targets": "adapters"}),
    (RegretSmoothMax, "validation", {"baseline_batches": 2}),
    (RegretSmoothMax, "train", {"baseline_batches": 2, "targets": "adapters"}),
]
LEARNER_IDS = [
    "AdaMerging",
    "GradientCE",
    "SuperMerge",
    "SuperMerge-distilled",
    "RegretSmoothMax",
    "RegretSmoothMax-distilled",
]


@pytest.mark.parametrize("learner_class,split,options", LEARNERS, ids=LEARNER_IDS)
def test_learner_trains_and_its_export_reproduces_the_model(zoo, tasks, tmp_path, learner_class, split, options):
    learner = learner_class(str(tasks), ["alpha", "beta"], ["alpha", "beta"], **options)
    before = learner.coefficients.values()
    fit(learner, data_for(tasks, split), 3, tmp_path)
    assert learner.coefficients.values() != before
    bundle = export_learned_merge(learner, str(tmp_path / "out"), save="lora")
    spec = yaml.safe_load((bundle / "merge_spec.yaml").read_text())
    assert spec["method"] == "weighted_delta_n"
    assert json.loads((bundle / "coefficients.json").read_text())["values"] == learner.coefficients.values()
    assert (bundle / "coefficients.png").read_bytes()[:4] == b"\x89PNG"
    saved = sorted((tmp_path / "out" / "merged" / "weighted_delta_n" / "alpha_beta" / "runs").iterdir())[-1]
    assert_saved_merge_is_the_learned_model(zoo, learner, saved)


def assert_saved_merge_is_the_learned_model(zoo, learner, saved):
    """The merged adapter in ``saved``, loaded by PEFT with task alpha's head, gives the learner's
    logits on alpha; returns the batch and those logits."""
    tokenizer = AutoTokenizer.from_pretrained(zoo["bert"])
    batch = tokenizer(["good film plot", "the movie was awful and boring"], return_tensors="pt", padding=True)
    merged = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(zoo["bert"]), saved).eval()
    learner.model.eval()
    with torch.no_grad():
        learned = learner.task_logits("alpha", batch)
        merged.base_model.model.set_submodule("classifier", learner.heads["alpha"])
        torch.testing.assert_close(merged(**batch).logits, learned, atol=1e-5, rtol=1e-4)
    return batch, learned


def test_adamerging_lowers_entropy(tasks, tmp_path):
    learner = AdaMerging(str(tasks), ["alpha", "beta"], ["alpha", "beta"], granularity="task_wise", lr=0.05)
    losses = []

    class Record(CoefficientLogger):
        def on_train_batch_end(self, trainer, pl_module, outputs, *args):
            losses.append(float(outputs["loss"]))

    data = data_for(tasks, "test")
    data.fit_batch_size = 20  # the whole test split in every step: the same objective each step
    fit(learner, data, 12, tmp_path, callbacks=[Record()])
    assert losses[-1] < losses[0]


def test_gradient_ce_prefers_the_adapter_that_fits(zoo, tasks, tmp_path):
    """Relabel alpha's validation data with the predictions of alpha's own adapter: CE pulls the
    merge toward alpha's adapter and away from beta's."""
    catalog = yaml.safe_load(tasks.read_text())
    entry = catalog["tasks"]["alpha"]
    rows = json.loads((tasks.parent / entry["dataset"]["data_files"]["validation"]).read_text())
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(zoo["bert"]), entry["adapter"])
    tokenizer = AutoTokenizer.from_pretrained(zoo["bert"])
    with torch.no_grad():
        predicted = model.eval()(**tokenizer([r["text"] for r in rows], return_tensors="pt", padding=True)).logits
    for row, label in zip(rows, predicted.argmax(-1).tolist()):
        row["label"] = entry["label_names"][label]
    (tmp_path / "fit.json").write_text(json.dumps(rows))
    entry["dataset"] = {"path": "json", "data_files": {"validation": str(tmp_path / "fit.json")}}
    relabeled = tmp_path / "catalog.yaml"
    relabeled.write_text(yaml.safe_dump({"tasks": {"alpha": entry, "beta": catalog["tasks"]["beta"]}}))
    learner = GradientCE(str(relabeled), ["alpha", "beta"], ["alpha"], ce_task_weighting="equal", lr=0.05, init=0.5)
    data = CatalogDataModule(str(relabeled), ["alpha"], fit_split="validation", batch_size=12)
    fit(learner, data, 15, tmp_path)
    ((alpha, beta),) = learner.coefficients.values()
    assert alpha > 0.5 > beta


def test_tensorboard_holds_coefficients_and_heatmap(tasks, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learner = AdaMerging(str(tasks), ["alpha", "beta"], ["alpha", "beta"])
    trainer = fit(learner, data_for(tasks, "test"), 2, tmp_path, callbacks=[CoefficientLogger(1, 1)])
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    scalars = events.Tags()["scalars"]
    for group in learner.coefficients.group_names:
        assert f"coefficients/{group}/alpha" in scalars and f"coefficients/{group}/beta" in scalars
    assert "train/entropy/alpha" in scalars and "predicted_distribution/alpha/0" in scalars
    assert "coefficients/heatmap" in events.Tags()["images"]


def test_adamerging_logs_a_summary_instead_of_a_vocabulary_of_classes(tasks, monkeypatch):
    learner = AdaMerging(str(tasks), ["alpha", "beta"], ["alpha", "beta"], distribution_max_classes=4)
    logged = {}
    monkeypatch.setattr(learner, "log", lambda name, value, **options: logged.setdefault(name, float(value)))
    few, many = torch.randn(6, 3), torch.zeros(6, 1000)
    many[:, 7] = 10.0  # every example predicts class 7: a collapse
    learner.task_objective("alpha", few, {})
    learner.task_objective("beta", many, {})
    assert sorted(k for k in logged if k.startswith("predicted_distribution/alpha/")) == [
        f"predicted_distribution/alpha/{i}" for i in range(3)
    ]
    beta = {k.rpartition("/")[2]: v for k, v in logged.items() if k.startswith("predicted_distribution/beta/")}
    assert set(beta) == {"entropy", "top1_mass", "top5_mass"}
    assert beta["top1_mass"] > 0.9 and beta["top5_mass"] >= beta["top1_mass"] and beta["entropy"] < 0.5


def test_cpu_mixed_precision_runs_the_model_in_bf16_and_half_true_is_refused(tasks, tmp_path):
    values, output_dtypes = {}, {}
    for precision in ("32-true", "bf16-mixed"):
        learner = AdaMerging(str(tasks), ["alpha", "beta"], ["alpha", "beta"], lr=0.05)
        seen, task_logits = output_dtypes.setdefault(precision, set()), learner.task_logits
        learner.task_logits = lambda task, batch: seen.add((logits := task_logits(task, batch)).dtype) or logits
        fit(learner, data_for(tasks, "test"), 2, tmp_path, precision=precision, accelerator="cpu")
        values[precision] = torch.tensor(learner.coefficients.values())
    assert output_dtypes == {"32-true": {torch.float32}, "bf16-mixed": {torch.bfloat16}}
    # bf16 rounds the forward, not the optimizer: two steps land close to float32's, not on them.
    assert not torch.equal(values["bf16-mixed"], values["32-true"])
    torch.testing.assert_close(values["bf16-mixed"], values["32-true"], atol=2e-3, rtol=0)
    learner = AdaMerging(str(tasks), ["alpha", "beta"], ["alpha", "beta"])
    with pytest.raises(ConfigError, match="trainer.precision bf16-true: .* use bf16-mixed"):
        fit(learner, data_for(tasks, "test"), 1, tmp_path, precision="bf16-true", accelerator="cpu")


def test_model_dtype_auto_is_float32_on_cpu_and_half_models_keep_a_float32_merged_path(tasks, tmp_path):
    assert resolve_model_dtype("auto", "cpu") == torch.float32 and resolve_model_dtype("auto", "cuda") is None
    assert resolve_model_dtype("bf16", "cpu") == torch.bfloat16
    learner = AdaMerging(str(tasks), ["alpha", "beta"], ["alpha", "beta"], lr=0.05, model_dtype="bf16")
    before = learner.coefficients.values()
    fit(learner, data_for(tasks, "test"), 2, tmp_path)
    module = next(iter(learner.fused.modules.values()))
    assert module.base.weight.dtype == learner.heads["alpha"].weight.dtype == torch.bfloat16
    assert module.A_cat.dtype == torch.float32 and learner.coefficients.raw.dtype == torch.float32
    assert learner.coefficients.values() != before


def test_only_coefficients_train_and_checkpoints_hold_only_them(tasks, tmp_path):
    learner = RegretSmoothMax(str(tasks), ["alpha", "beta"], ["alpha", "beta"], baseline_batches=1)
    trainer = fit(learner, data_for(tasks, "validation"), 2, tmp_path)
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["coefficients.raw"]
    assert learner.hparams.tau == 0.1 and learner.hparams.parametrization == "softmax"
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"]
    assert list(state) == ["coefficients.raw"]
    assert abs(sum(learner.coefficients.values()[0]) - 1) < 1e-6


def test_resume_from_checkpoint_continues_the_same_trajectory(tasks, tmp_path):
    """One epoch, its checkpoint, then a second epoch from it: the same coefficients as two epochs
    in a row (the shuffled order is a function of seed and epoch)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(epochs, ckpt=None, callbacks=()):
        seed_everything(0, workers=True)
        learner = AdaMerging(str(tasks), ["alpha", "beta"], ["alpha", "beta"], lr=0.05)
        trainer = Trainer(
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
            callbacks=list(callbacks),
        )
        trainer.fit(learner, datamodule=data_for(tasks, "test"), ckpt_path=ckpt)
        return torch.tensor(learner.coefficients.values())

    straight = run(2)
    first = run(1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    resumed = run(2, ckpt=tmp_path / "ckpt" / "last.ckpt")
    torch.testing.assert_close(resumed, straight, atol=1e-6, rtol=0)
    assert first.ne(straight).any()


@pytest.mark.parametrize("average", [0.0, 0.8], ids=["plain", "averaged"])
def test_resume_mid_epoch_continues_the_same_trajectory(tasks, tmp_path, average):
    """A checkpoint after 3 of an epoch's 5 batches, resumed to 8 steps: the same coefficients,
    bit for bit, as 8 steps in a row (the loaders skip the 3 batches, then go on into epoch 2);
    with ``coefficient_average`` the checkpoint carries the average, which the merge ends with."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, ckpt=None, callbacks=()):
        options = {"lr": 0.05, "init": 0.5, "coefficient_average": average}
        learner = AdaMerging(str(tasks), ["alpha", "beta"], ["alpha", "beta"], **options)
        trainer = Trainer(
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
            callbacks=list(callbacks),
        )
        trainer.fit(learner, datamodule=data_for(tasks, "test"), ckpt_path=ckpt)
        assert trainer.num_training_batches == 5
        return torch.tensor(learner.coefficients.values())

    straight = run(8)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_last=True)
    first = run(3, callbacks=[checkpoints])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
    resumed = run(8, ckpt=tmp_path / "ckpt" / "last.ckpt")
    assert torch.equal(resumed, straight) and not torch.equal(first, straight)


class RecordCoefficients(Callback):
    """The raw coefficients as training steps start and end, and as validation reads them."""

    def __init__(self) -> None:
        self.starts, self.ends, self.validated = [], [], []

    def on_train_batch_start(self, trainer, module, *args) -> None:  # noqa: ANN001
        self.starts.append(module.coefficients.raw.detach().clone())

    def on_train_batch_end(self, trainer, module, *args) -> None:  # noqa: ANN001
        self.ends.append(module.coefficients.raw.detach().clone())

    def on_validation_batch_start(self, trainer, module, *args) -> None:  # noqa: ANN001
        self.validated.append(module.coefficients.raw.detach().clone())


@pytest.mark.parametrize("keep_best", [False, True], ids=["last", "best"])
def test_validation_and_the_merge_read_the_coefficient_average(tasks, tmp_path, keep_best):
    record = RecordCoefficients()
    callbacks = [record, BestCoefficients("val/loss")] if keep_best else [record]
    learner = SuperMerge(str(tasks), ["alpha", "beta"], variant="task_wise", lr=0.3, coefficient_average=0.5)
    seed_everything(0, workers=True)
    trainer = Trainer(
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(learner, datamodule=data_for(tasks, "train"))
    t1, t2, t3, t4 = record.ends
    after_two = 0.5 * t1 + 0.5 * t2  # the average starts at the first step's coefficients
    after_four = 0.5 * (0.5 * after_two + 0.5 * t3) + 0.5 * t4
    validated = [v for i, v in enumerate(record.validated) if i == 0 or not torch.equal(v, record.validated[i - 1])]
    assert len(validated) == 2
    torch.testing.assert_close(validated[0], after_two)
    torch.testing.assert_close(validated[1], after_four)
    # Training went on from the trained coefficients, not from the average it validated.
    assert torch.equal(record.starts[2], t2) and not torch.allclose(t2, after_two)
    final = learner.coefficients.raw.detach()
    if not keep_best:
        torch.testing.assert_close(final, after_four)
    else:
        assert any(torch.allclose(final, v, atol=1e-6, rtol=0) for v in validated)  # kept as tanh values
    with pytest.raises(ConfigError, match=r"model.coefficient_average: a decay in \[0, 1\), got 1.0"):
        SuperMerge(str(tasks), ["alpha", "beta"], coefficient_average=1.0)


FIT_CONFIG = """
model:
  class_path: lmerge.learn.SuperMerge
  init_args: {{adapters: [alpha, beta], variant: task_wise, lr: 0.05, targets: adapters}}
data: {{catalog: {catalog}, tasks: [alpha, beta], fit_split: test, batch_size: {batch}}}
trainer: {{max_steps: 3, logger: false, enable_checkpointing: false, enable_progress_bar: false, limit_val_batches: 0}}
export: {{output_dir: {out}}}
"""


KILL_CONFIG = """
seed_everything: 0
model:
  class_path: lmerge.learn.AdaMerging
  init_args: {{adapters: [alpha, beta], lr: 0.05, init: 0.5}}
data: {{catalog: {catalog}, tasks: [alpha, beta], fit_split: test, batch_size: 1}}
trainer:
  max_steps: 30
  logger: false
  enable_progress_bar: false
  limit_val_batches: 0
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {checkpoints}, every_n_train_steps: 3, save_last: true, save_top_k: -1}}
export: {{output_dir: {out}}}
"""


@pytest.mark.slow
def test_fit_killed_mid_epoch_resumes_to_the_same_coefficients(tasks, tmp_path):
    """``lmerge fit`` SIGKILLed once a checkpoint exists (epochs of 20 steps, a checkpoint every 3,
    so the last one is mid-epoch), then the same command with ``--ckpt_path last``: the exported
    coefficients equal those of an uninterrupted run, bit for bit."""
    import signal
    import time

    def command(name):
        config = tmp_path / f"{name}.yaml"
        checkpoints, out = tmp_path / name / "checkpoints", tmp_path / name / "out"
        config.write_text(KILL_CONFIG.format(catalog=tasks, checkpoints=checkpoints, out=out))
        return [sys.executable, "-m", "lmerge", "fit", "--config", str(config), "--trainer.accelerator", "cpu"]

    def exported(name):
        return json.loads(next((tmp_path / name / "out").rglob("coefficients.json")).read_text())["values"]

    def finish(arguments):
        done = subprocess.run(arguments, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]

    finish(command("straight"))
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    child = subprocess.Popen(command("killed"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not last.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not list((tmp_path / "killed" / "out").rglob("coefficients.json"))
    step = torch.load(last, weights_only=True)["global_step"]
    assert 0 < step < 30 and step % 20 != 0  # killed mid-epoch
    finish([*command("killed"), "--ckpt_path", "last"])
    assert exported("killed") == exported("straight")


FSDP_STRATEGY = ["--trainer.strategy.class_path", "fsdp_cpu.CPUFSDPStrategy", "--trainer.devices", "2"]


def fit_on_cpu(config: Path, cwd: Path, extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
    """``lmerge fit --config config`` on the CPU in a child process (``extra`` flags after it)."""
    command = [sys.executable, "-m", "lmerge", "fit", "--config", str(config), "--trainer.accelerator", "cpu"]
    done = subprocess.run([*command, *(extra or [])], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def fsdp_env(**variables: str) -> dict[str, str]:
    """The environment of a child run that imports ``tests/fsdp_cpu.py``, plus ``variables``."""
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **variables}


@pytest.mark.slow
@pytest.mark.parametrize("rank_wise", [False, True], ids=["task_wise", "rank_wise_mixing_grouped"])
def test_ddp_on_two_cpu_processes_agrees_with_one(tasks, tmp_path, rank_wise):
    """Two gloo processes with 4 examples each take the same steps as one process with 8 (SuperMerge
    distilling: each step also runs each task's own adapter, without gradient). Rank-wise, with rank
    mixing and batches grouped by length: every rank coefficient and mixing matrix agrees too (the
    grouping is of the global batch, so the two processes' halves are the one process's batch)."""
    runs = {}
    for name, batch, extra in (("single", 8, []), ("ddp", 4, ["--trainer.strategy", "ddp", "--trainer.devices", "2"])):
        config = tmp_path / f"{name}.yaml"
        text = FIT_CONFIG.format(catalog=tasks, batch=batch, out=tmp_path / name)
        if rank_wise:
            text = text.replace("variant: task_wise,", "variant: rank_wise, rank_mixing_lr: 0.05,")
            text = text.replace("batch_size:", "group_by_length: true, batch_size:")
        config.write_text(text)
        fit_on_cpu(config, tmp_path, extra)
        if rank_wise:
            runs[name] = learned_rank_spec(tmp_path / name)
        else:
            runs[name] = json.loads(next((tmp_path / name).rglob("coefficients.json")).read_text())["values"]
    if rank_wise:
        assert_same_rank_spec(runs["ddp"], runs["single"])
    else:
        torch.testing.assert_close(torch.tensor(runs["ddp"]), torch.tensor(runs["single"]), atol=1e-5, rtol=0)


def learned_rank_spec(out: Path) -> list[list]:
    """The exported weighted_rank spec under ``out``: every module's per-adapter rank weights, and its mixing matrix."""
    params = yaml.safe_load(next(out.rglob("merge_spec.yaml")).read_text())["method_params"]
    return [[row for rows in params["rank_weights"].values() for row in rows], list(params["rank_mixing"].values())]


def assert_same_rank_spec(got: list[list], expected: list[list], atol: float = 1e-5) -> None:
    assert any(abs(v) > 1e-4 for matrix in expected[1] for row in matrix for v in row)  # N learned
    for got_part, expected_part in zip(got, expected, strict=True):
        for a, b in zip(got_part, expected_part, strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=atol, rtol=0)


FSDP_CONFIG = """
model:
  class_path: lmerge.learn.AdaMerging
  init_args: {{adapters: ["yes", maybe], granularity: layer_wise, lr: 0.05, distillation_weight: 1.0}}
data: {{catalog: {catalog}, tasks: ["yes", maybe], fit_split: test, batch_size: {batch}}}
trainer: {{max_steps: 3, logger: false, enable_checkpointing: false, enable_progress_bar: false, limit_val_batches: 0}}
export: {{output_dir: {out}}}
"""


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_agrees_with_one(zoo, tasks, tmp_path):
    """Lightning's FSDP (``tests/fsdp_cpu.py``: the stock strategy given the CPU device) over two gloo
    processes, 4 examples each, on the Llama tasks: each decoder layer is its own FSDP unit (the base
    model sharded), the coefficients are replicated, and the learned coefficients equal one process's
    with 8 examples, AdaMerging's anchor (a second, gradient-free forward of each task's own adapter
    in every step) included. GradientCE, whose baselines run the model before training, learns under
    FSDP too."""
    from transformers import AutoModelForCausalLM

    report = tmp_path / "report"
    report.mkdir()
    env = fsdp_env(FSDP_REPORT_DIR=str(report))
    runs = {}
    for name, batch, extra in (("single", 8, []), ("fsdp", 4, FSDP_STRATEGY)):
        config = tmp_path / f"{name}.yaml"
        config.write_text(FSDP_CONFIG.format(catalog=tasks, batch=batch, out=tmp_path / name))
        fit_on_cpu(config, tmp_path, extra, env)
        exported = next((tmp_path / name).rglob("coefficients.json"))
        runs[name] = json.loads(exported.read_text())["values"]
    ranks = [json.loads((report / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(zoo["llama"]).parameters())
    assert all(rank["units"] == 3 for rank in ranks)  # the root and each of the two decoder layers
    assert sum(rank["base_elements"] for rank in ranks) == base  # each holds its shard, no more
    assert all(rank["coefficient_elements"] == 4 for rank in ranks)  # 2 layers x 2 adapters, whole on each
    assert runs["fsdp"] != [[0.3, 0.3]] * 2
    torch.testing.assert_close(torch.tensor(runs["fsdp"]), torch.tensor(runs["single"]), atol=1e-5, rtol=0)
    # A learner that runs the model before training (GradientCE's single-adapter baselines, outside any
    # step): its forward is routed through FSDP's wrapper, else the root's weights would still be sharded.
    config = tmp_path / "gradient.yaml"
    text = FSDP_CONFIG.format(catalog=tasks, batch=4, out=tmp_path / "gradient")
    text = text.replace("lmerge.learn.AdaMerging", "lmerge.learn.GradientCE").replace("test,", "validation,")
    text = text.replace(", distillation_weight: 1.0", "")
    config.write_text(text.replace("lr: 0.05}", "lr: 0.05, ce_baseline_batches: 2}"))
    fit_on_cpu(config, tmp_path, FSDP_STRATEGY, env)
    values = json.loads(next((tmp_path / "gradient").rglob("coefficients.json")).read_text())["values"]
    assert values != [[0.3, 0.3]] * 2


@pytest.mark.slow
def test_fsdp_rank_wise_with_rank_mixing_agrees_with_one_process(tasks, tmp_path):
    """Under FSDP (two gloo processes, the Llama tasks, batches grouped by length) rank-wise AdaMerging
    with rank mixing learns every rank coefficient and mixing matrix that one process learns."""
    runs = {}
    for name, batch, extra in (("single", 8, []), ("fsdp", 4, FSDP_STRATEGY)):
        text = FSDP_CONFIG.format(catalog=tasks, batch=batch, out=tmp_path / name)
        text = text.replace("granularity: layer_wise,", "granularity: rank_wise, rank_mixing_lr: 0.05,")
        config = tmp_path / f"{name}.yaml"
        config.write_text(text.replace("batch_size:", "group_by_length: true, batch_size:"))
        fit_on_cpu(config, tmp_path, extra, fsdp_env())
        runs[name] = learned_rank_spec(tmp_path / name)
    # Sharded reductions sum in another order: float32 noise of 2e-5 to 1.1e-4 depending on the CPU's
    # kernels (AVX512 machines the most), against coefficients that moved by 0.1-0.25 in 3 steps (a
    # gradient left unaveraged moves them by about lr = 0.05, and failed this by 0.08).
    assert_same_rank_spec(runs["fsdp"], runs["single"], atol=5e-4)


def test_lora_finetune_saves_a_peft_adapter_that_learned(zoo, tasks, tmp_path):
    from lmerge.adapters import LoraAdapter
    from lmerge.learn import LoraFinetune

    out = tmp_path / "adapter"
    learner = LoraFinetune(str(tasks), ["alpha"], str(zoo["bert"]), output_dir=str(out), r=4, lora_dropout=0.0, lr=0.02)
    data = CatalogDataModule(str(tasks), ["alpha"], fit_split="train", batch_size=8, tokenizer=str(zoo["bert"]))
    data.setup("fit")
    whole = next(iter(data.tasks["alpha"].dataloader("train", batch_size=100)))
    learner.configure_model()

    def train_loss():
        learner.model.eval()
        with torch.no_grad():
            return float(learner._loss(whole)[0])

    before = train_loss()
    fit(learner, data, 20, tmp_path)
    assert train_loss() < before
    adapter = LoraAdapter(out)
    assert adapter.task_type == "SEQ_CLS" and adapter.head_state()
    assert {s.rank for s in adapter.shapes.values()} == {4}
    assert not list(tmp_path.glob(".adapter*"))  # staged and swapped, nothing left behind


def test_lora_finetune_gives_a_base_with_another_classifier_a_fresh_head(zoo, tasks, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lmerge.learn import LoraFinetune

    five_labels = tmp_path / "base"
    kwargs = {"num_labels": 5, "ignore_mismatched_sizes": True}
    AutoModelForSequenceClassification.from_pretrained(zoo["bert"], **kwargs).save_pretrained(five_labels)
    learner = LoraFinetune(str(tasks), ["alpha"], str(five_labels), output_dir=str(tmp_path / "adapter"))
    learner.configure_model()
    assert learner.model.base_model.model.classifier.modules_to_save["default"].out_features == 3


def test_hierarchical_supermerge_merges_groups_first(zoo, tasks, tmp_path):
    """Within-group stage: each task sees only its group's adapters; group stage: group weights
    learn with the within-group coefficients frozen; the export is their product."""
    hierarchical = {"enabled": True, "groups": [["alpha"], ["beta"]], "stage_steps": 2}
    learner = SuperMerge(
        str(tasks), ["alpha", "beta"], ["alpha", "beta"], variant="task_wise", hierarchical=hierarchical
    )
    seen = []

    class Spy(CoefficientLogger):
        def on_train_batch_end(self, trainer, pl_module, *args):
            coefficients = pl_module.coefficients
            seen.append((coefficients.raw.detach().clone(), coefficients.across.detach().clone()))

    fit(learner, data_for(tasks, "validation"), 4, tmp_path, callbacks=[Spy()])
    (within_1, across_1), (within_2, across_2), (within_3, across_3), (within_4, across_4) = seen
    assert not torch.equal(within_1, within_2) and torch.equal(across_1, across_2) and across_2.eq(1).all()
    assert torch.equal(within_2, within_4) and not torch.equal(across_3, across_4)
    product = torch.tanh(within_4) * across_4
    torch.testing.assert_close(torch.tensor(learner.coefficients.values()), product)
    spec = learner.merge_spec()
    assert spec["method_params"]["allow_negative_coefficients"] is True


def test_hierarchical_task_forward_uses_only_its_group(tasks):
    learner = SuperMerge(
        str(tasks),
        ["alpha", "beta"],
        ["alpha", "beta"],
        variant="task_wise",
        hierarchical={"group_size": 1, "stage_steps": 1},
    )
    learner.configure_model()
    learner.coefficients.set_stage(within=True)
    learner.coefficients.only_group_of(1)
    assert learner.coefficients()[0, 0] == 0 and learner.coefficients()[0, 1] != 0


def test_merge_config_with_a_learner_merges_what_it_learned(tasks, tmp_path, capsys):
    from lmerge.__main__ import main

    config = tmp_path / "m.yaml"
    config.write_text(
        f"adapters: [alpha, beta]\ncatalog: {tasks}\nmethod: weighted_delta_n\n"
        "optimizer: {name: gradient, params: {max_steps: 2, batch_size: 4, ce_baseline_batches: 1, "
        "progress_bar: false, early_stopping_min_delta: 0.01}}\n"
        f"eval_tasks: [alpha]\noutput_dir: {tmp_path / 'out'}\n"
    )
    assert main(["merge", "--config", str(config)]) == 0, capsys.readouterr().err
    run_dir = capsys.readouterr().out.split("run bundle: ")[1].strip()
    meta = json.loads((tmp_path / run_dir / "merge_metadata.json").read_text())
    assert meta["optimizer"]["name"] == "gradient" and meta["optimizer"]["steps"] == 2
    assert meta["params"]["weights"] == meta["optimizer"]["values"][0]
    config.write_text(config.read_text().replace("early_stopping_min_delta", "early_stopping_mindelta"))
    assert main(["merge", "--config", str(config)]) == 2
    assert "optimizer.params.early_stopping_mindelta: not a setting of optimizer 'gradient'" in capsys.readouterr().err


class LossSpy(CoefficientLogger):
    """Records each training step's loss and the coefficients after that step."""

    def __init__(self):
        super().__init__()
        self.losses, self.values = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.values.append(pl_module.coefficients.values())


def test_learner_early_stopping_waits_for_warmup_and_minimum_steps(tasks, tmp_path):
    """Patience counts training steps from the warm-up on; the run stops once patience is spent
    and the minimum number of steps is reached (a huge threshold: no step is an improvement)."""
    learner = SuperMerge(
        str(tasks),
        ["alpha", "beta"],
        ["alpha", "beta"],
        early_stopping_patience=2,
        early_stopping_threshold=1e9,
        early_stopping_warmup_steps=1,
        min_optimizer_steps_before_early_stop=4,
    )
    fit(learner, data_for(tasks, "validation"), 10, tmp_path)
    # Step 1 sets the best; steps 2 and 3 spend the patience; step 4 is the first allowed stop.
    assert learner.global_step == 4


def test_learner_restores_the_coefficients_of_its_lowest_training_loss(tasks, tmp_path):
    learner = SuperMerge(str(tasks), ["alpha", "beta"], ["alpha", "beta"], lr=0.5, restore_best_checkpoint=True)
    spy = LossSpy()
    fit(learner, data_for(tasks, "validation"), 6, tmp_path, callbacks=[spy])
    best = min(range(len(spy.losses)), key=spy.losses.__getitem__)
    assert best != len(spy.losses) - 1, "the test needs a run whose last step is not its best"
    assert learner.coefficients.values() == spy.values[best]


def test_the_export_writes_the_restored_best_coefficients(tasks, tmp_path):
    """The merge export (at fit's end) runs after the best coefficients are restored (at train's end)."""
    from lmerge.callbacks import MergeExport

    learner = SuperMerge(str(tasks), ["alpha", "beta"], ["alpha", "beta"], lr=0.5, restore_best_checkpoint=True)
    spy, export = LossSpy(), MergeExport(output_dir=str(tmp_path / "out"))
    fit(learner, data_for(tasks, "validation"), 6, tmp_path, callbacks=[spy, export])
    best = min(range(len(spy.losses)), key=spy.losses.__getitem__)
    assert best != len(spy.losses) - 1, "the test needs a run whose last step is not its best"
    exported = json.loads((export.bundle / "coefficients.json").read_text())["values"]
    assert exported == spy.values[best] == learner.coefficients.values()


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("supermerge", "coefficient_parameterization", "tanh_alpha"),
        ("supermerge", "normalize_coefficients", False),
        ("gradient", "ce_baseline_source", "single_task_eval"),
    ],
)
def test_one_valued_learner_settings_of_old_merge_configs_are_ignored_with_a_warning(tasks, name, key, value):
    from lmerge.learn.from_config import train_learner

    # The unknown key after it stops the run before anything is built.
    with pytest.warns(DeprecationWarning, match=f"optimizer.params.{key} is ignored"):
        with pytest.raises(ConfigError, match="optimizer.params.bogus: not a setting"):
            train_learner(name, {key: value, "bogus": 1}, str(tasks), ["alpha", "beta"], "common")


def test_learner_stopping_callbacks_join_configured_ones_and_their_state_is_checkpointed(tasks, tmp_path):
    """The learner's own early stopping and best restore come as callbacks beside (not instead
    of) those a config composes, e.g. ``callbacks/early_stopping.yaml``."""
    from lightning.pytorch.callbacks import EarlyStopping

    from lmerge.learn.callbacks import BestCoefficients, BestStepCoefficients, StepEarlyStopping

    learner = SuperMerge(
        str(tasks), ["alpha", "beta"], ["alpha", "beta"], early_stopping_patience=5, restore_best_checkpoint=True
    )
    configured = [EarlyStopping("val/loss", check_on_train_epoch_end=False), BestCoefficients()]
    trainer = fit(learner, data_for(tasks, "validation"), 3, tmp_path, callbacks=configured)
    assert all(any(c is own for own in trainer.callbacks) for c in configured)
    own = {type(c): c for c in trainer.callbacks}
    assert torch.isfinite(own[StepEarlyStopping].rule.best_score) and own[BestStepCoefficients].best is not None
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]
    assert any(key.startswith("StepEarlyStopping") for key in saved) and "BestStepCoefficients" in saved


def test_lora_finetune_saves_the_best_validation_checkpoint_not_the_last(zoo, tasks, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from safetensors.torch import load_file

    from lmerge.learn import LoraFinetune

    out = tmp_path / "adapter"
    learner = LoraFinetune(str(tasks), ["alpha"], str(zoo["bert"]), output_dir=str(out), r=4, lora_dropout=0.0, lr=0.05)
    data = CatalogDataModule(str(tasks), ["alpha"], fit_split="train", batch_size=8, tokenizer=str(zoo["bert"]))
    # "Best" = the highest validation loss, so that the best checkpoint is an early one, not the last.
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", mode="max", save_top_k=1)
    seed_everything(0, workers=True)
    trainer = Trainer(
        max_steps=8,
        logger=False,
        callbacks=[best],
        val_check_interval=1,
        check_val_every_n_epoch=None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(learner, datamodule=data)
    assert best.best_model_path and trainer.global_step == 8
    stored = torch.load(best.best_model_path, weights_only=True)["state_dict"]
    saved = load_file(out / "adapter_model.safetensors")
    lora_b = next(k for k in saved if "lora_B" in k)
    in_checkpoint = next(v for k, v in stored.items() if k.endswith(lora_b.replace(".weight", ".default.weight")))
    assert torch.equal(saved[lora_b], in_checkpoint)
    assert int(best.best_model_path.split("step=")[1].split(".")[0]) < 8  # not the last step's weights


def test_holdout_trains_on_one_part_of_the_fit_split_and_validates_on_the_other(tasks):
    whole = data_for(tasks, "validation")
    whole.setup("fit")
    data = data_for(tasks, "validation", holdout=0.25, seed=3)
    data.setup("fit")
    assert data.split_tasks("validation") == ["alpha", "beta"]
    for task in ("alpha", "beta"):
        examples = whole.tasks[task].examples("validation")
        kept, held = data._part(task, held_out=False), data._part(task, held_out=True)
        assert len(held) == max(1, round(0.25 * len(examples))) and len(kept) + len(held) == len(examples)
        ids = lambda part: sorted(tuple(e["input_ids"]) for e in part)  # noqa: E731
        assert ids(kept + held) == ids(examples)
        assert ids(held) == ids(data_for(tasks, "validation", holdout=0.25, seed=3)._part(task, held_out=True))
        trained = [e for batch in data.train_dataloader().iterables[task] for e in batch["input_ids"].tolist()]
        assert len(trained) == len(kept)
    validated = data.val_dataloader()
    assert sum(len(batch["input_ids"]) for batch in validated.iterables["alpha"]) == len(data._part("alpha", True))
    with pytest.raises(ConfigError, match=r"data.holdout: must be in \[0, 1\), got 1.0"):
        data_for(tasks, "validation", holdout=1.0)
