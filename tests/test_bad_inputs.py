"""Every bad input to every verb (merge, evaluate, sweep, fit) ends in one line naming the
culprit, exit code 2, no traceback, no new output and earlier outputs untouched."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lmerge.__main__ import main


def copy_adapter(zoo, name: str, dest: Path) -> Path:
    shutil.copytree(zoo[name], dest)
    return dest


def edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def edit_tensors(path: Path, edit) -> Path:
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")
    return path


class Exploit:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def pickle_only(zoo, tmp: Path) -> Path:
    path = copy_adapter(zoo, "bert_a", tmp / "pickled")
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(pickle.dumps(Exploit(tmp / "pwned")))
    return path


def nan_weights(zoo, tmp):
    def poison(tensors):
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = float("nan")

    return edit_tensors(copy_adapter(zoo, "bert_b", tmp / "nan"), poison)


def inf_weights(zoo, tmp):
    def poison(tensors):
        key = next(k for k in tensors if "lora_A" in k)
        tensors[key][0, 0] = float("-inf")

    return edit_tensors(copy_adapter(zoo, "bert_b", tmp / "inf"), poison)


def wrong_shape(zoo, tmp):
    def widen(tensors):
        for key in [k for k in tensors if "layer.0.attention.self.query.lora_B" in k]:
            tensors[key] = torch.randn(48, tensors[key].shape[1])

    return edit_tensors(copy_adapter(zoo, "bert_b", tmp / "wide"), widen)


def truncated(zoo, tmp):
    path = copy_adapter(zoo, "bert_b", tmp / "truncated")
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return path


def corrupt(zoo, tmp):
    path = copy_adapter(zoo, "bert_b", tmp / "corrupt")
    (path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    return path


def empty_file(zoo, tmp):
    path = copy_adapter(zoo, "bert_b", tmp / "empty")
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def no_config(zoo, tmp):
    path = copy_adapter(zoo, "bert_b", tmp / "noconfig")
    (path / "adapter_config.json").unlink()
    return path


def bad_json(zoo, tmp):
    path = copy_adapter(zoo, "bert_b", tmp / "badjson")
    (path / "adapter_config.json").write_text("{not json")
    return path


def rank_lie(zoo, tmp):
    return edit_config(copy_adapter(zoo, "bert_b", tmp / "ranklie"), r=16)


def config_file(tmp: Path, text: str) -> Path:
    path = tmp / "config.yaml"
    path.write_text(text)
    return path


# (id, builder(zoo, tmp) -> argv after "merge", text the one error line must contain)
MERGE_CASES = [
    (
        "unknown method",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "nope"],
        "unknown method 'nope'; valid: dare",
    ),
    (
        "missing adapter dir",
        lambda z, t: ["--adapters", f"[{t / 'gone'}]", "--method", "ties"],
        "gone: adapter directory does not exist",
    ),
    (
        "pickle-only adapter",
        lambda z, t: ["--adapters", f"[{pickle_only(z, t)}]", "--method", "ties"],
        "adapter_model.bin: pickle weights are refused",
    ),
    (
        "dora adapter",
        lambda z, t: [
            "--adapters",
            f"[{edit_config(copy_adapter(z, 'bert_a', t / 'dora'), use_dora=True)}]",
            "--method",
            "ties",
        ],
        "use_dora is true",
    ),
    (
        "non-lora peft type",
        lambda z, t: [
            "--adapters",
            f"[{edit_config(copy_adapter(z, 'bert_a', t / 'ia3'), peft_type='IA3')}]",
            "--method",
            "ties",
        ],
        "peft_type 'IA3' is not LORA",
    ),
    (
        "bias training",
        lambda z, t: [
            "--adapters",
            f"[{edit_config(copy_adapter(z, 'bert_a', t / 'bias'), bias='all')}]",
            "--method",
            "ties",
        ],
        "bias='all'",
    ),
    (
        "different base models",
        lambda z, t: ["--adapters", f"[{z['bert_a']},{z['llama_a']}]", "--method", "ties"],
        "different base models",
    ),
    (
        "shape mismatch",
        lambda z, t: ["--adapters", f"[{z['bert_a']},{wrong_shape(z, t)}]", "--method", "ties"],
        "shape mismatch",
    ),
    (
        "nan weights",
        lambda z, t: ["--adapters", f"[{z['bert_a']},{nan_weights(z, t)}]", "--method", "ties"],
        "holds NaN or Inf",
    ),
    (
        "truncated weights",
        lambda z, t: ["--adapters", f"[{truncated(z, t)}]", "--method", "ties"],
        "truncated/adapter_model.safetensors: not a readable safetensors file",
    ),
    (
        "corrupt weights",
        lambda z, t: ["--adapters", f"[{corrupt(z, t)}]", "--method", "ties"],
        "corrupt/adapter_model.safetensors: not a readable",
    ),
    (
        "empty weights file",
        lambda z, t: ["--adapters", f"[{empty_file(z, t)}]", "--method", "ties"],
        "empty/adapter_model.safetensors: not a readable",
    ),
    (
        "missing adapter_config",
        lambda z, t: ["--adapters", f"[{no_config(z, t)}]", "--method", "ties"],
        "adapter_config.json: missing",
    ),
    (
        "invalid adapter_config",
        lambda z, t: ["--adapters", f"[{bad_json(z, t)}]", "--method", "ties"],
        "adapter_config.json: invalid JSON",
    ),
    (
        "rank differs from config",
        lambda z, t: ["--adapters", f"[{rank_lie(z, t)}]", "--method", "ties"],
        "has rank 4 but adapter_config.json says 16",
    ),
    (
        "drop_rate out of range",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "dare", "--method_params.drop_rate", "1.0"],
        "method_params.drop_rate",
    ),
    (
        "k out of range",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--method_params.k", "150"],
        "method_params.k",
    ),
    (
        "k not a number",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--method_params.k", "lots"],
        "method_params.k",
    ),
    (
        "weights wrong length",
        lambda z, t: [
            "--adapters",
            f"[{z['bert_a']},{z['bert_b']}]",
            "--method",
            "weighted_delta_n",
            "--method_params.weights",
            "[0.5]",
        ],
        "method_params.weights",
    ),
    (
        "negative weight",
        lambda z, t: [
            "--adapters",
            f"[{z['bert_a']},{z['bert_b']}]",
            "--method",
            "weighted_delta_n",
            "--method_params.weights",
            "[0.5, -1]",
        ],
        "method_params.weights",
    ),
    (
        "missing required param",
        lambda z, t: ["--adapters", f"[{z['bert_a']},{z['bert_b']}]", "--method", "weighted_delta_n"],
        "method_params.weights is required",
    ),
    (
        "unknown param",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--method_params.density", "0.2"],
        "method_params.density: not a parameter of method 'ties' (valid: k, lambda, space)",
    ),
    (
        "too few adapters",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "weighted_delta"],
        "needs at least 2 adapters",
    ),
    (
        "too many adapters",
        lambda z, t: ["--adapters", f"[{z['bert_a']},{z['bert_b']},{z['bert_d']}]", "--method", "weighted_delta"],
        "at most 2 adapters",
    ),
    (
        "factor method with unequal ranks",
        lambda z, t: ["--adapters", f"[{z['bert_a']},{z['bert_c']}]", "--method", "uniform"],
        "rank",
    ),
    ("empty adapter list", lambda z, t: ["--adapters", "[]", "--method", "ties"], "adapters: the list is empty"),
    (
        "duplicate adapters",
        lambda z, t: ["--adapters", f"[{z['bert_a']},{z['bert_a']}]", "--method", "ties"],
        "is the same adapter as",
    ),
    (
        "task not in catalog",
        lambda z, t: ["--adapters", "[sentiment]", "--method", "ties"],
        "'sentiment' is neither a directory nor a task",
    ),
    (
        "missing catalog file",
        lambda z, t: ["--adapters", "[sentiment]", "--method", "ties", "--catalog", str(t / "cat.yaml")],
        "cat.yaml: catalog does not exist",
    ),
    (
        "strict mode difference",
        lambda z, t: ["--adapters", f"[{z['llama_a']},{z['llama_c']}]", "--method", "ties", "--merge_mode", "strict"],
        "merge_mode strict: adapter 'llama_a' has modules the others lack",
    ),
    (
        "bad merge_mode",
        lambda z, t: ["--adapters", f"[{z['llama_a']}]", "--method", "ties", "--merge_mode", "loose"],
        "merge_mode",
    ),
    (
        "unknown transform",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--transforms", "[{name: sharpen}]"],
        "transforms[0].name: unknown transform 'sharpen'; valid: identity, layer_l2_normalize",
    ),
    (
        "bad transform param",
        lambda z, t: [
            "--adapters",
            f"[{z['bert_a']}]",
            "--method",
            "ties",
            "--transforms",
            "[{name: layer_l2_normalize, params: {target_norm: -1}}]",
        ],
        "transforms[0].params.target_norm",
    ),
    (
        "unknown lambda policy",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--lambda_policy", "cosine"],
        "unknown lambda policy 'cosine'; valid: per_layer, scalar",
    ),
    (
        "policy layer not in adapters",
        lambda z, t: [
            "--adapters",
            f"[{z['bert_a']}]",
            "--method",
            "ties",
            "--lambda_policy",
            "{type: per_layer, overrides: {7: 0.1}}",
        ],
        "layer 7 is not in the adapters (layers 0-1)",
    ),
    (
        "policy layer that is not a whole number",
        lambda z, t: [
            "--adapters",
            f"[{z['bert_a']}]",
            "--method",
            "ties",
            "--lambda_policy",
            "{type: per_layer, overrides: {0.5: 3.0}}",
        ],
        "lambda_policy.overrides: 0.5 is not a layer index",
    ),
    (
        "policy value beside another lambda, which it would override",
        lambda z, t: [
            "--adapters",
            f"[{z['bert_a']}]",
            "--method",
            "ties",
            "--method_params.lambda",
            "0.3",
            "--lambda_policy",
            "{value: 1.3}",
        ],
        "lambda_policy.value: sets lambda for every layer, so method_params.lambda (0.3) would be ignored",
    ),
    (
        "policy value that is a bool",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--lambda_policy", "{value: true}"],
        "lambda_policy.value: expected a number, got True",
    ),
    (
        "policy on method without lambda",
        lambda z, t: [
            "--adapters",
            f"[{z['bert_a']}]",
            "--method",
            "uniform_delta",
            "--lambda_policy",
            "{type: per_layer, default: 0.2}",
        ],
        "has no lambda parameter",
    ),
    (
        "malformed yaml",
        lambda z, t: ["--config", str(config_file(t, "adapters: [a\nmethod: : ties\n"))],
        "config.yaml: line",
    ),
    (
        "unknown config key",
        lambda z, t: ["--config", str(config_file(t, "adapters: [a]\nmethodd: ties\n"))],
        "config.yaml: methodd: unknown key for lmerge merge",
    ),
    (
        "config not a mapping",
        lambda z, t: ["--config", str(config_file(t, "- a\n- b\n"))],
        "expected a mapping of config keys",
    ),
    ("missing config file", lambda z, t: ["--config", str(t / "nope.yaml")], "nope.yaml: config file does not exist"),
    (
        "config section not a mapping",
        lambda z, t: ["--config", str(config_file(t, "adapters: [a]\nmethod: ties\nsave: 3\n"))],
        "save: expected a mapping of format, rank, base_model; got 3",
    ),
    (
        "wrong type for save.rank",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--save.rank", "big"],
        "save.rank",
    ),
    (
        "save.rank zero",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--save.rank", "0"],
        "save.rank: must be a positive integer",
    ),
    (
        "unsafe tag",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--tag", "../../etc"],
        "tag '../../etc' is not a safe file name",
    ),
    (
        "full save without base model",
        lambda z, t: [
            "--adapters",
            f"[{edit_config(copy_adapter(z, 'bert_a', t / 'nobase'), base_model_name_or_path=None)}]",
            "--method",
            "ties",
            "--save.format",
            "full",
        ],
        "give save.base_model",
    ),
    (
        "unknown optimizer",
        lambda z, t: [
            "--adapters",
            f"[{z['bert_a']},{z['bert_b']}]",
            "--method",
            "weighted_delta_n",
            "--optimizer",
            "nope",
        ],
        "optimizer.name: unknown optimizer 'nope'; did you mean 'none'? valid: adamerging",
    ),
    (
        "optimizer for a method it cannot learn",
        lambda z, t: ["--adapters", f"[{z['bert_a']},{z['bert_b']}]", "--method", "ties", "--optimizer", "adamerging"],
        "optimizer adamerging: it learns weighted_delta_n coefficients",
    ),
    (
        "optimizer without task data",
        lambda z, t: [
            "--adapters",
            f"[{z['bert_a']},{z['bert_b']}]",
            "--method",
            "weighted_delta_n",
            "--optimizer",
            "{name: adamerging, params: {max_steps: 2}}",
        ],
        "optimizer adamerging: learning needs a task catalog",
    ),
    (
        "lambda not finite",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--method_params.lambda", "inf"],
        "method_params.lambda: expected a finite number, got inf",
    ),
    (
        "inf weights",
        lambda z, t: ["--adapters", f"[{z['bert_a']},{inf_weights(z, t)}]", "--method", "ties"],
        "holds NaN or Inf",
    ),
    (
        "unknown flag",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--bogus", "1"],
        "unrecognized arguments: --bogus",
    ),
]


# ---- the verbs' other bad inputs ------------------------------------------------------------------
def catalog_with(tasks: Path, tmp: Path, name: str, **alpha_changes) -> Path:
    """A copy of the test catalog whose task ``alpha`` has ``alpha_changes``."""
    entries = yaml.safe_load(tasks.read_text())["tasks"]
    entries["alpha"] = {**entries["alpha"], **alpha_changes}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"tasks": entries}))
    return path


def alpha_test_file(tasks: Path, tmp: Path, edit) -> dict:
    """Task alpha's test rows passed through ``edit``, as a catalog ``dataset`` entry."""
    data = yaml.safe_load(tasks.read_text())["tasks"]["alpha"]["dataset"]
    rows = json.loads((tasks.parent / data["data_files"]["test"]).read_text())
    path = tmp / "rows.json"
    path.write_text(json.dumps([edit(i, row) for i, row in enumerate(rows)]))
    return {"path": "json", "data_files": {"test": str(path)}}


def bundle_with_bad_head(zoo, tmp: Path) -> Path:
    path = copy_adapter(zoo, "bert_a", tmp / "bundle")
    (path / "heads").mkdir()
    (path / "heads" / "alpha.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{not a header")
    return path


def bundle_with_bad_metadata(zoo, tmp: Path) -> Path:
    path = copy_adapter(zoo, "bert_a", tmp / "bundle")
    (path / "merge_metadata.json").write_text("{truncated")
    return path


# (id, builder(zoo, catalog, tmp) -> argv after "evaluate", text the one error line must contain)
EVALUATE_CASES = [
    ("eval task not in catalog", lambda z, c, t: ["--catalog", c, "--eval_tasks", "[gamma]"], "'gamma' is not a task"),
    (
        "eval catalog missing",
        lambda z, c, t: ["--catalog", t / "no.yaml", "--eval_tasks", "[alpha]"],
        "no.yaml: catalog",
    ),
    (
        "eval malformed catalog",
        lambda z, c, t: ["--catalog", config_file(t, "tasks: {alpha: [\n"), "--eval_tasks", "[alpha]"],
        "config.yaml: line",
    ),
    (
        "eval catalog unknown key",
        lambda z, c, t: ["--catalog", catalog_with(c, t, "cat", colour="red"), "--eval_tasks", "[alpha]"],
        "tasks.alpha: unknown key 'colour'",
    ),
    (
        "eval dataset missing column",
        lambda z, c, t: [
            "--catalog",
            catalog_with(c, t, "cat", dataset=alpha_test_file(c, t, lambda i, r: {"text": r["text"]})),
            "--eval_tasks",
            "[alpha]",
        ],
        "rows.json (split test) has no column 'label'",
    ),
    (
        "eval dataset unknown label",
        lambda z, c, t: [
            "--catalog",
            catalog_with(
                c,
                t,
                "cat",
                dataset=alpha_test_file(c, t, lambda i, r: {**r, "label": "weather" if i == 3 else r["label"]}),
            ),
            "--eval_tasks",
            "[alpha]",
        ],
        "split test, row 3: unknown label 'weather'",
    ),
    (
        "eval unknown split",
        lambda z, c, t: ["--catalog", c, "--eval_tasks", "[alpha]", "--split", "holdout"],
        "split: unknown split 'holdout'",
    ),
    (
        "eval batch size zero",
        lambda z, c, t: ["--catalog", c, "--eval_tasks", "[alpha]", "--eval_batch_size", "0"],
        "eval_batch_size: must be a positive integer",
    ),
    (
        "eval subset out of range",
        lambda z, c, t: ["--catalog", c, "--eval_tasks", "[alpha]", "--eval_subset", "{max_samples: -3}"],
        "eval_subset.max_samples",
    ),
    (
        "eval tasks of two kinds",
        lambda z, c, t: ["--catalog", c, "--eval_tasks", "[alpha,maybe]"],
        "tasks of different kinds",
    ),
    (
        "eval adapter and merge config",
        lambda z, c, t: [
            "--catalog",
            c,
            "--eval_tasks",
            "[alpha]",
            "--adapter",
            z["bert_a"],
            "--merge_config",
            "m.yaml",
        ],
        "give --adapter or --merge_config, not both",
    ),
    (
        "eval adapter missing",
        lambda z, c, t: ["--catalog", c, "--eval_tasks", "[alpha]", "--adapter", t / "gone"],
        "gone: adapter directory does not exist",
    ),
    (
        "eval bundle metadata corrupt",
        lambda z, c, t: ["--catalog", c, "--eval_tasks", "[alpha]", "--adapter", bundle_with_bad_metadata(z, t)],
        "merge_metadata.json: invalid JSON",
    ),
    (
        "eval bundle head corrupt",
        lambda z, c, t: ["--catalog", c, "--eval_tasks", "[alpha]", "--adapter", bundle_with_bad_head(z, t)],
        "heads/alpha.safetensors: not a readable safetensors file",
    ),
    (
        "eval merge config unknown key",
        lambda z, c, t: [
            "--catalog",
            c,
            "--eval_tasks",
            "[alpha]",
            "--merge_config",
            config_file(t, "adapters: [alpha]\nmethodd: ties\n"),
        ],
        "config.yaml: methodd: unknown key",
    ),
]

# (id, builder(zoo, catalog, tmp) -> argv after "sweep", text the one error line must contain)
SWEEP = ["--adapters", "[alpha,beta]", "--method", "weighted_delta"]
SWEEP_CASES = [
    ("sweep unknown search type", lambda z, c, t: [*SWEEP, "--catalog", c, "--search.type", "cosmic"], "search.type"),
    ("sweep empty grid", lambda z, c, t: [*SWEEP, "--catalog", c, "--search.type", "grid"], "search.grid: empty"),
    (
        "sweep grid of a foreign param",
        lambda z, c, t: [*SWEEP, "--catalog", c, "--search.grid.density", "[0.1]"],
        "search.grid.density: not a parameter of method 'weighted_delta'",
    ),
    (
        "sweep grid not a list",
        lambda z, c, t: [*SWEEP, "--catalog", c, "--search.grid.lambda", "lots"],
        "search.grid.lambda: expected a non-empty list",
    ),
    (
        "sweep without evaluation",
        lambda z, c, t: [*SWEEP, "--search.grid.lambda", "[0.5]"],
        "eval_tasks: a sweep ranks points by their evaluation",
    ),
    (
        "sweep bayes budget zero",
        lambda z, c, t: [*SWEEP, "--catalog", c, "--search.type", "bayes", "--search.budget", "0"],
        "search.budget",
    ),
    (
        "sweep eval task not in catalog",
        lambda z, c, t: [*SWEEP, "--catalog", c, "--search.grid.lambda", "[0.5]", "--eval_tasks", "[alpha,gamma]"],
        "gamma",
    ),
    (
        "sweep storage without its driver",
        lambda z, c, t: [*SWEEP, "--catalog", c, "--search.grid.lambda", "[0.5]", "--storage", "mysql://u@h/db"],
        "storage mysql://u@h/db: cannot be opened",
    ),
    (
        "sweep config unknown key",
        lambda z, c, t: ["--config", config_file(t, "adapters: [alpha]\nmethod: ties\nserach: {}\n")],
        "config.yaml: serach: unknown key for lmerge sweep",
    ),
]


def fit_config(catalog: Path, tmp: Path, extra: str = "") -> Path:
    """A small AdaMerging fit config over the test catalog (plus ``extra`` YAML lines)."""
    path = tmp / "fit.yaml"
    path.write_text(
        "model:\n  class_path: lmerge.learn.AdaMerging\n  init_args: {adapters: [alpha, beta]}\n"
        f"data: {{catalog: {catalog}, tasks: [alpha, beta], fit_split: test, batch_size: 4}}\n"
        f"trainer: {{max_steps: 1, logger: false, default_root_dir: {tmp / 'out'}}}\n{extra}"
    )
    return path


# (id, builder(zoo, catalog, tmp) -> argv after "fit", text the one error line must contain)
FIT_CASES = [
    (
        "fit unknown learner",
        lambda z, c, t: ["--config", fit_config(c, t), "--model.class_path", "lmerge.learn.Nope"],
        "model: Problem with given class_path 'lmerge.learn.Nope'",
    ),
    (
        "fit learner not a LightningModule",
        lambda z, c, t: ["--config", fit_config(c, t), "--model.class_path", "collections.OrderedDict"],
        "collections.OrderedDict does not correspond to a subclass of LightningModule",
    ),
    (
        "fit catalog missing",
        lambda z, c, t: ["--config", fit_config(c, t), "--data.catalog", t / "no.yaml"],
        "no.yaml: catalog does not exist",
    ),
    (
        "fit task not in catalog",
        lambda z, c, t: ["--config", fit_config(c, t), "--data.tasks", "[alpha,gamma]"],
        "'gamma' is not a task in catalog",
    ),
    (
        "fit unknown trainer key",
        lambda z, c, t: ["--config", fit_config(c, t), "--trainer.bogus", "1"],
        "--trainer.bogus",
    ),
    (
        "fit wrong type",
        lambda z, c, t: ["--config", fit_config(c, t), "--trainer.max_steps", "lots"],
        "trainer.max_steps\": Expected a <class 'int'>. Got value: lots",
    ),
    (
        "fit bad learner option",
        lambda z, c, t: ["--config", fit_config(c, t), "--model.init_args.granularity", "sideways"],
        "granularity: Expected a typing.Literal['task_wise', 'layer_wise', 'rank_wise']. Got value: sideways",
    ),
    ("fit unknown config key", lambda z, c, t: ["--config", fit_config(c, t, "extra_key: 1\n")], "extra_key"),
    (
        "fit negative learning rate",
        lambda z, c, t: ["--config", fit_config(c, t), "--model.init_args.lr", "-1"],
        "model.lr: must be a positive number, got -1",
    ),
    (
        "fit accelerator this machine lacks",
        lambda z, c, t: ["--config", fit_config(c, t), "--trainer.accelerator", "tpu"],
        "trainer: ",
    ),
    (
        "fit fsdp on a cpu",
        lambda z, c, t: ["--config", fit_config(c, t), "--trainer.accelerator", "cpu", "--trainer.strategy", "fsdp"],
        "trainer: The strategy `fsdp` requires a GPU accelerator",
    ),
    (
        "fit export root is a file",
        lambda z, c, t: ["--config", fit_config(c, t), "--export.output_dir", config_file(t, "a file\n")],
        "config.yaml: exists and is not a directory",
    ),
    (
        "fit scheduler without optimizer",
        lambda z, c, t: [
            "--config",
            fit_config(c, t),
            "--lr_scheduler",
            "CosineAnnealingLR",
            "--lr_scheduler.T_max",
            "5",
        ],
        "lr_scheduler: Lightning applies it only with an optimizer given too",
    ),
    (
        "fit missing checkpoint",
        lambda z, c, t: ["--config", fit_config(c, t), "--ckpt_path", t / "gone.ckpt"],
        "gone.ckpt: checkpoint file does not exist",
    ),
]

VERB_CASES = (
    [("evaluate", *case) for case in EVALUATE_CASES]
    + [("sweep", *case) for case in SWEEP_CASES]
    + [("fit", *case) for case in FIT_CASES]
)


# ---- the checks ------------------------------------------------------------------------------------
def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): a file's SHA-256, a link's target, or 'dir'."""
    digest = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            digest[name] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            digest[name] = "dir"
        else:
            digest[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def earlier_outputs(root: Path) -> dict[str, str]:
    """An output root holding an earlier run, its index and a per-task link; returns its digest."""
    run = root / "merged" / "ties" / "alpha_beta" / "runs" / "run_20240101_000000"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"method": "ties"}\n')
    (run.parents[1] / "eval").mkdir()
    (run.parents[1] / "eval" / "index.json").write_text('[{"merge_tag": "ties"}]\n')
    link = root / "alpha" / "metrics" / "eval" / "test" / "merged" / "beta" / "ties" / "metrics.json"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(run / "summary.json", link.parent))
    return tree_digest(root)


def assert_refused(code: int, err: str, expected: str, root: Path, before: dict[str, str]) -> None:
    """Exit code 2, exactly one ``lmerge: error:`` line holding ``expected``, no traceback,
    and the output root exactly as it was."""
    lines = [line for line in err.strip().splitlines() if "DeprecationWarning" not in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("lmerge: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert tree_digest(root) == before


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_bad_merge_input_is_one_clear_line(zoo, tmp_path, capsys, case):
    _, build, expected = case
    out_dir = tmp_path / "out"
    before = earlier_outputs(out_dir)
    code = main(["merge", *[str(a) for a in build(zoo, tmp_path)], "--output_dir", str(out_dir)])
    assert_refused(code, capsys.readouterr().err, expected, out_dir, before)


@pytest.mark.parametrize("case", VERB_CASES, ids=[f"{c[0]}: {c[1]}" for c in VERB_CASES])
def test_bad_input_to_other_verbs_is_one_clear_line(zoo, tasks, tmp_path, capsys, monkeypatch, case):
    verb, _, build, expected = case
    out_dir = tmp_path / "out"
    before = earlier_outputs(out_dir)
    monkeypatch.chdir(out_dir)  # anything written to the working directory shows in the digest
    output = [] if verb == "fit" else ["--output_dir", str(out_dir)]
    code = main([verb, *[str(a) for a in build(zoo, tasks, tmp_path)], *output])
    assert_refused(code, capsys.readouterr().err, expected, out_dir, before)


def test_output_dir_is_a_file(zoo, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    before = tree_digest(tmp_path)
    code = main(["merge", "--adapters", f"[{zoo['bert_a']}]", "--method", "ties", "--output_dir", str(blocker)])
    assert_refused(code, capsys.readouterr().err, "exists and is not a directory", tmp_path, before)


# ---- through the real command -------------------------------------------------------------------
def lmerge_command() -> list[str]:
    """The installed console script, or ``python -m lmerge`` where there is none."""
    script = Path(sys.executable).with_name("lmerge")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lmerge"]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def _file_size_limit(limit: int):
    def apply() -> None:
        # Past the limit a write fails with EFBIG (as on a full disk) instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _without_root_override() -> None:
    # Drop the capabilities that let root write anywhere (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH,
    # CAP_FOWNER) from the bounding set, so the command root runs obeys file modes.
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _can_run(preexec) -> bool:  # noqa: ANN001
    try:
        return subprocess.run([sys.executable, "-c", "pass"], preexec_fn=preexec).returncode == 0
    except subprocess.SubprocessError:
        return False


def read_only(root: Path) -> list[Path]:
    """Make every folder under ``root`` (and it) read-only; returns them."""
    folders = [p for p in [root, *root.rglob("*")] if p.is_dir() and not p.is_symlink()]
    for folder in folders:
        folder.chmod(0o555)
    return folders


def test_bad_input_through_the_real_command(zoo, tasks, tmp_path):
    """Five cases through the installed command, run at once: merge onto a disk that fills up
    (RLIMIT_FSIZE: the adapter write fails with EFBIG), merge into a read-only output root (as
    root, without the capabilities that override file modes), evaluate with an unknown label,
    sweep with an unknown search type, fit with an unknown learner."""
    pair = f"[{zoo['bert_a']},{zoo['bert_b']}]"
    full = tmp_path / "full"
    assert main(["merge", "--adapters", pair, "--method", "ties", "--output_dir", str(full)]) == 0
    locked = tmp_path / "locked"
    bad_labels = catalog_with(
        tasks, tmp_path, "labels", dataset=alpha_test_file(tasks, tmp_path, lambda i, r: {**r, "label": "weather"})
    )
    fit_yaml = fit_config(tasks, tmp_path)
    no_override = _without_root_override if os.geteuid() == 0 else None
    # name: (argv, output root, text of the one error line, preexec_fn)
    runs = {
        "merge, disk full": (
            ["merge", "--adapters", pair, "--method", "ties"],
            full,
            "cannot be written (File too large)",
            _file_size_limit(2048),
        ),
        "merge, read-only output": (
            ["merge", "--adapters", pair, "--method", "ties"],
            locked,
            "not writable",
            no_override,
        ),
        "evaluate": (
            ["evaluate", "--catalog", str(bad_labels), "--eval_tasks", "[alpha]"],
            tmp_path / "evaluate",
            "split test, row 0: unknown label 'weather'",
            None,
        ),
        "sweep": (
            ["sweep", *SWEEP, "--catalog", str(tasks), "--search.type", "cosmic"],
            tmp_path / "sweep",
            "search.type",
            None,
        ),
        "fit": (
            ["fit", "--config", str(fit_yaml), "--model.class_path", "lmerge.learn.Nope"],
            tmp_path / "out",  # the fit config's trainer.default_root_dir
            "class_path 'lmerge.learn.Nope'",
            None,
        ),
    }
    if no_override and not _can_run(no_override):
        del runs["merge, read-only output"]  # root here cannot drop CAP_DAC_OVERRIDE: it writes anywhere
    befores = {
        name: tree_digest(root) if root.exists() else earlier_outputs(root) for name, (_, root, _, _) in runs.items()
    }
    folders = read_only(locked)
    try:
        children = {
            name: subprocess.Popen(
                lmerge_command() + argv + ([] if argv[0] == "fit" else ["--output_dir", str(root)]),
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=child_env(),
                preexec_fn=preexec,
            )
            for name, (argv, root, _, preexec) in runs.items()
        }
        for name, child in children.items():
            _, err = child.communicate(timeout=300)
            _, root, expected, _ = runs[name]
            assert_refused(child.returncode, err, expected, root, befores[name])
    finally:
        for folder in folders:
            folder.chmod(0o755)
