"""A merge's LoRA is written module by module: the safetensors file it assembles at the end is the
format's own (safetensors and PEFT read it back exactly), and the writer keeps no module's tensors."""

from __future__ import annotations

import gc
import json
import struct
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lmerge.errors import OutputError
from lmerge.outputs.tensor_stream import CODES, StreamedTensors


def test_tensors_of_every_factor_dtype_come_back_exactly(tmp_path):
    torch.manual_seed(0)
    tensors = {f"m{i}.{dtype}".replace("torch.", ""): torch.randn(3 + i, 5).to(dtype) for i, dtype in enumerate(CODES)}
    tensors["transposed"] = torch.randn(4, 6).T  # not contiguous: written in its logical order
    stream = StreamedTensors(tmp_path / "w.safetensors.part", root=tmp_path)
    for name, tensor in tensors.items():
        stream.add(name, tensor)
    stream.finish(tmp_path / "w.safetensors", metadata={"format": "pt"})
    loaded = load_file(tmp_path / "w.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    with safe_open(tmp_path / "w.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert not (tmp_path / "w.safetensors.part").exists()
    raw = (tmp_path / "w.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0 and json.loads(raw[8 : 8 + length])["m0.float32"]["data_offsets"][0] == 0


def test_the_writer_keeps_no_tensor_and_refuses_a_name_twice(tmp_path):
    stream = StreamedTensors(tmp_path / "w.part", root=tmp_path)
    tensor = torch.ones(1000)
    alive = weakref.ref(tensor)
    stream.add("a", tensor)
    del tensor
    gc.collect()
    assert alive() is None  # on disk only: a merge's memory does not grow with the modules saved
    with pytest.raises(ValueError, match="'a' is already"):
        stream.add("a", torch.zeros(2))


def test_an_empty_file_is_valid(tmp_path):
    stream = StreamedTensors(tmp_path / "w.part", root=tmp_path)
    stream.finish(tmp_path / "w.safetensors")
    assert load_file(tmp_path / "w.safetensors") == {}


def test_a_path_outside_the_root_is_refused_before_anything_is_written(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(OutputError):
        StreamedTensors(tmp_path / "elsewhere.part", root=root)
    stream = StreamedTensors(root / "w.part", root=root)
    with pytest.raises(OutputError):
        stream.finish(tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()
