"""Every bad input ends in one line naming the culprit, exit code 2, no traceback and no output."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
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
CASES = [
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
        "method_params.density: not a parameter of method 'ties' (valid: k, lambda)",
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
        "unknown flag",
        lambda z, t: ["--adapters", f"[{z['bert_a']}]", "--method", "ties", "--bogus", "1"],
        "unrecognized arguments: --bogus",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(zoo, tmp_path, capsys, case):
    _, build, expected = case
    out_dir = tmp_path / "out"
    argv = ["merge", *[str(a) for a in build(zoo, tmp_path)], "--output_dir", str(out_dir)]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "DeprecationWarning" not in line]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("lmerge: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not list(out_dir.rglob("*.safetensors")) and not list(out_dir.rglob("*.json"))


def test_malicious_pickle_is_never_executed(zoo, tmp_path, capsys):
    path = pickle_only(zoo, tmp_path)
    assert main(["merge", "--adapters", f"[{path}]", "--method", "ties", "--output_dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "pwned").exists()


def test_output_dir_is_a_file(zoo, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    code = main(["merge", "--adapters", f"[{zoo['bert_a']}]", "--method", "ties", "--output_dir", str(blocker)])
    assert code == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


def test_output_dir_not_writable(zoo, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        code = main(["merge", "--adapters", f"[{zoo['bert_a']}]", "--method", "ties", "--output_dir", str(locked)])
        assert code == 2 and "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_disk_full_on_save_leaves_nothing(zoo, tmp_path, capsys, monkeypatch):
    """ENOSPC while the adapter is written: a clear error, no run bundle, earlier runs untouched."""
    import errno

    import lmerge.adapters.save as save_module

    out = tmp_path / "out"
    assert (
        main(
            ["merge", "--adapters", f"[{zoo['bert_a']},{zoo['bert_b']}]", "--method", "ties", "--output_dir", str(out)]
        )
        == 0
    )
    before = sorted(p for p in out.rglob("*"))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(save_module, "save_file", full_disk)
    capsys.readouterr()
    code = main(
        ["merge", "--adapters", f"[{zoo['bert_a']},{zoo['bert_b']}]", "--method", "ties", "--output_dir", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and err.count("\n") == 1
    assert sorted(p for p in out.rglob("*")) == before
