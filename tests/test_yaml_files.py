"""The strict reader of user YAML and JSON: duplicate keys, alias bombs, deep nesting and huge
files are refused quickly, with bounded memory, in one line naming the file (and the line)."""

from __future__ import annotations

import importlib
import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
from test_bad_inputs import assert_refused, earlier_outputs

from lmerge.__main__ import main
from lmerge.adapters import LoraAdapter
from lmerge.errors import AdapterError, ConfigError
from lmerge.yaml_files import MAX_DEPTH, MAX_FILE_BYTES, read_json, read_yaml


def laughs(levels: int, width: int = 10) -> str:
    """The "billion laughs" alias bomb: ``width ** levels`` values from a few lines."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels + 1):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def deep_flow(depth: int) -> str:
    return "a: " + "[" * depth + "]" * depth + "\n"


def deep_block(depth: int) -> str:
    return "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "leaf\n"


# (id, file text, text the ConfigError must hold after the file name)
REFUSED_YAML = [
    (
        "duplicate key",
        "method: ties\nadapters: [a]\nmethod: dare\n",
        "line 3: duplicate key 'method' (first given on line 1)",
    ),
    ("nested duplicate key", "save:\n  format: lora\n  format: full\n", "line 3: duplicate key 'format'"),
    ("duplicate in flow mapping", "lambda_policy: {type: per_layer, type: scalar}\n", "duplicate key 'type'"),
    ("keys equal once parsed", "1: a\n0x1: b\n", "line 2: duplicate key 1"),
    ("billion laughs", laughs(9), "aliases expand to more than 1,000,000 values"),
    ("recursive alias", "a: &a [1, *a]\n", "line 1: an alias refers to the value that contains it"),
    ("deep flow nesting", deep_flow(100_000), f"line 1: nested deeper than {MAX_DEPTH} levels"),
    ("deep block nesting", deep_block(500), f"nested deeper than {MAX_DEPTH} levels"),
    (
        "deep through aliases",
        "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n",
        "aliases nest deeper",
    ),
    ("malformed", "adapters: [a\nmethod: : ties\n", "malformed YAML"),
    ("not a mapping", "- a\n- b\n", "expected a mapping of config keys, got list"),
    ("binary", None, "not a text file"),
]


@pytest.mark.parametrize("case", REFUSED_YAML, ids=[c[0] for c in REFUSED_YAML])
def test_hostile_yaml_is_refused_quickly_with_bounded_memory(tmp_path, case):
    _, text, expected = case
    path = tmp_path / "config.yaml"
    if text is None:
        path.write_bytes(b"\xff\xfe\x00garbage\x80")
    else:
        path.write_text(text)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as refused:
            read_yaml(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "\n" not in message
    assert peak < 64 << 20  # a bomb is refused before it is expanded


def test_merge_keys_may_override_and_anchors_may_be_shared(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "defaults: &d {format: lora, rank: 8}\nsave: {<<: *d, format: full}\ngrid: &g [0.1, 0.2]\nother: *g\n"
    )
    data = read_yaml(path)
    assert data["save"] == {"format": "full", "rank": 8}
    assert data["other"] == [0.1, 0.2]


def test_files_over_the_size_limit_are_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ConfigError, match=r"big.yaml: config file is larger than 16 MiB"):
        read_yaml(path)
    with pytest.raises(AdapterError, match=r"big.yaml: adapter config is larger than 16 MiB"):
        read_json(path, "adapter config", error=AdapterError)


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"r": 4, "r": 8}', "duplicate key 'r'"),
        ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_DEPTH} levels"),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
        ('{"a": ', "invalid JSON"),
    ],
    ids=["duplicate key", "deep past the recursion limit", "just too deep", "truncated"],
)
def test_json_is_read_strictly(tmp_path, text, expected):
    path = tmp_path / "merge_metadata.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_json(path)
    assert str(refused.value).startswith(f"{path}: ") and expected in str(refused.value)
    path.write_text(json.dumps({"a": [[[1]]]}))
    assert read_json(path) == {"a": [[[1]]]}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("adapters: [a]\nmethod: ties\nmethod: dare\n", "line 3: duplicate key 'method'"),
        (laughs(9), "line 6: aliases expand to more than"),
        (deep_flow(50_000), "line 1: nested deeper than"),
    ],
    ids=["duplicate key", "alias bomb", "deep nesting"],
)
def test_every_verb_reads_configs_strictly(zoo, tasks, tmp_path, capsys, monkeypatch, text, expected):
    """``--config`` of merge, sweep and fit (which jsonargparse reads), and catalogs, go through
    the strict reader: refused in one line, with bounded memory."""
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(text)
    out = tmp_path / "out"
    before = earlier_outputs(out)
    monkeypatch.chdir(out)  # fit would write lightning_logs/ here
    output = ["--output_dir", str(out)]
    # What fit imports on first use is loaded now: the memory measured is the reading's alone.
    importlib.import_module("lmerge.lightning_cli")
    importlib.import_module("lightning.pytorch.cli")
    importlib.import_module("lmerge.callbacks")
    for argv in (
        ["merge", "--config", str(hostile), *output],
        ["sweep", "--config", str(hostile), *output],
        ["merge", "--adapters", "[alpha]", "--method", "ties", "--catalog", str(hostile), *output],
        ["evaluate", "--catalog", str(hostile), "--eval_tasks", "[alpha]", *output],
        ["fit", "--config", str(hostile)],
    ):
        tracemalloc.start()
        try:
            code = main(argv)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert_refused(code, capsys.readouterr().err, f"{hostile}: {expected}", out, before)
        assert peak < 64 << 20, f"{argv[0]}: {peak} bytes"  # refused before anything is expanded


def test_adapter_config_too_deep_is_one_line(zoo, tmp_path, capsys):
    path = Path(shutil.copytree(zoo["bert_a"], tmp_path / "deep"))
    config = json.loads((path / "adapter_config.json").read_text())
    text = json.dumps(config)[:-1] + ', "eva_config": ' + "[" * 5000 + "]" * 5000 + "}"
    (path / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError, match=r"deep/adapter_config.json: nested deeper than 64 levels"):
        LoraAdapter(path)
    out = tmp_path / "out"
    before = earlier_outputs(out)
    code = main(["merge", "--adapters", f"[{path},{zoo['bert_b']}]", "--method", "ties", "--output_dir", str(out)])
    assert_refused(code, capsys.readouterr().err, "deep/adapter_config.json: nested deeper than 64 levels", out, before)
