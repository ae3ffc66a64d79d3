"""The distillation targets kept across fits (``lmerge.callbacks.TeacherCache``): a second fit from
the same adapters reads its own-adapter logits instead of computing them and learns the same
coefficients; anything the logits depend on changes the file; a bad file is computed again."""

from __future__ import annotations

import pytest
import torch
from test_learners import data_for, fit

from lmerge.__main__ import main
from lmerge.callbacks import TeacherCache
from lmerge.learn import SuperMerge
from lmerge.learn.base import MergeLearner
from lmerge.learn.teacher_cache import encode_rows, read_rows, teacher_keys

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture
def own_passes(monkeypatch) -> list[str]:
    """The tasks of every own-adapter pass the learners run."""
    calls = []
    real = MergeLearner._own_adapter_pass

    def counted(self, task, batch):
        calls.append(task)
        return real(self, task, batch)

    monkeypatch.setattr(MergeLearner, "_own_adapter_pass", counted)
    return calls


def distil(tasks, tmp_path, folder) -> SuperMerge:
    learner = SuperMerge(str(tasks), ["alpha", "beta"], ["alpha", "beta"], targets="adapters", lr=0.05)
    fit(learner, data_for(tasks, "train"), 4, tmp_path / folder, callbacks=[TeacherCache(str(tmp_path))])
    return learner


def test_a_second_fit_reads_the_teachers_and_learns_the_same_coefficients(tasks, tmp_path, own_passes):
    first = distil(tasks, tmp_path, "first")
    computed = len(own_passes)
    files = sorted((tmp_path / "teacher_logits").glob("*.safetensors"))
    assert [f.name.split("-")[0] for f in files] == ["alpha", "beta"] and computed > 0
    for task in ("alpha", "beta"):
        (path,) = [f for f in files if f.name.startswith(f"{task}-")]
        rows = read_rows(path)
        assert rows.keys() == first.own_logits_seen[task].keys()
        for key, row in rows.items():
            assert torch.equal(row, first.own_logits_seen[task][key])

    second = distil(tasks, tmp_path, "second")
    assert len(own_passes) == computed  # every target read from the files, none computed
    learned = first.coefficients.values()
    assert learned != SuperMerge(str(tasks), ["alpha", "beta"], ["alpha", "beta"]).coefficients.values()
    assert second.coefficients.values() == learned


def test_the_key_follows_what_the_logits_depend_on(tasks, zoo):
    learner = SuperMerge(str(tasks), ["alpha", "beta"], ["alpha", "beta"], targets="adapters")
    key = teacher_keys(learner, "bf16-mixed")["alpha"]
    assert teacher_keys(learner, "bf16-mixed")["alpha"] == key
    assert teacher_keys(learner, "32-true")["alpha"] != key
    assert teacher_keys(learner, "bf16-mixed")["beta"] != key
    other_adapters = SuperMerge(
        str(tasks), ["alpha", "beta", str(zoo["bert_c"])], ["alpha", "beta"], targets="adapters"
    )
    assert teacher_keys(other_adapters, "bf16-mixed")["alpha"] != key
    folded_differently = SuperMerge(
        str(tasks), ["alpha", "beta"], ["alpha", "beta"], targets="adapters", merge_impl="dense"
    )
    assert teacher_keys(folded_differently, "bf16-mixed")["alpha"] != key


def test_a_bad_file_is_computed_again_and_written_anew(tasks, tmp_path, own_passes):
    distil(tasks, tmp_path, "first")
    computed = len(own_passes)
    for path in (tmp_path / "teacher_logits").glob("*.safetensors"):
        path.write_bytes(b"not safetensors")
    distil(tasks, tmp_path, "second")
    assert len(own_passes) == 2 * computed
    assert all(read_rows(path) for path in (tmp_path / "teacher_logits").glob("*.safetensors"))


def test_rows_round_trip_and_inconsistent_offsets_read_as_none(tmp_path):
    rows = {(1, 2, 3): torch.tensor([0.5, -1.0]), (4,): torch.tensor([2.0, 3.0]), (5, 6): torch.tensor([0.0, 1.0])}
    path = tmp_path / "rows.safetensors"
    path.write_bytes(encode_rows(rows))
    read = read_rows(path)
    assert read.keys() == rows.keys() and all(torch.equal(read[k], rows[k]) for k in rows)
    assert read_rows(tmp_path / "missing.safetensors") == {}
    from safetensors.torch import save

    path.write_bytes(save({"logits": torch.zeros(2, 2), "tokens": torch.arange(3), "offsets": torch.tensor([0, 1, 5])}))
    assert read_rows(path) == {}


def test_a_task_without_its_own_adapter_among_the_merged_ones_keeps_no_file(tasks, zoo, tmp_path):
    learner = SuperMerge(str(tasks), ["alpha", str(zoo["bert_c"])], ["alpha", "beta"], lr=0.05)
    fit(learner, data_for(tasks, "validation"), 2, tmp_path, callbacks=[TeacherCache(str(tmp_path))])
    assert learner.coefficients.values() != SuperMerge(str(tasks), ["alpha", "beta"]).coefficients.values()
    assert not list(tmp_path.glob("teacher_logits/beta-*"))


def test_a_kind_without_heads_keeps_no_file(tasks, tmp_path):
    learner = SuperMerge(str(tasks), ["yes", "maybe"], ["yes"], targets="adapters", lr=0.05)
    fit(learner, data_for(tasks, "train", names=("yes",)), 2, tmp_path, callbacks=[TeacherCache(str(tmp_path))])
    assert not list(tmp_path.glob("teacher_logits/*"))


DISTIL_CONFIG = """
model:
  class_path: lmerge.learners.SuperMerge
  init_args: {{adapters: [alpha, beta], variant: task_wise, lr: 0.05, targets: adapters}}
data: {{catalog: {catalog}, tasks: [alpha, beta], fit_split: train, batch_size: 4}}
trainer: {{max_steps: 3, logger: false, enable_checkpointing: false, enable_progress_bar: false, limit_val_batches: 0}}
export: {{output_dir: {out}}}
"""


def test_lmerge_fit_keeps_the_teachers_in_its_output_folder_unless_told_not_to(tasks, tmp_path, own_passes):
    config = tmp_path / "fit.yaml"
    config.write_text(DISTIL_CONFIG.format(catalog=tasks, out=tmp_path / "out"))
    fit_command = ["fit", "--config", str(config), "--trainer.accelerator", "cpu"]
    fit_command += ["--trainer.default_root_dir", str(tmp_path)]  # its config.yaml goes there, not to the cwd
    assert main(fit_command) == 0
    computed = len(own_passes)
    assert computed > 0 and len(list((tmp_path / "out" / "teacher_logits").glob("*.safetensors"))) == 2
    assert main(fit_command) == 0
    assert len(own_passes) == computed
    elsewhere = tmp_path / "elsewhere"
    assert main([*fit_command, "--export.output_dir", str(elsewhere), "--teacher_cache.enabled", "false"]) == 0
    assert len(own_passes) == 2 * computed and not (elsewhere / "teacher_logits").exists()
