"""A merge's LoRA is written module by module: the safetensors file it assembles is the format's
own (safetensors and PEFT read it back exactly), its header goes into room left for it before the
data (the data is written once), and the writer keeps no module's tensors."""

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
from lmerge.outputs.tensor_stream import CODES, StreamedTensors, header_room


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {f"m{i}.{dtype}".replace("torch.", ""): torch.randn(3 + i, 5).to(dtype) for i, dtype in enumerate(CODES)}
    tensors["transposed"] = torch.randn(4, 6).T  # not contiguous: written in its logical order
    return tensors


def _header_length(path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("room", ["bound", "too small"])
def test_tensors_of_every_factor_dtype_come_back_exactly(tmp_path, room):
    tensors = _tensors()
    largest = {name: (tensor.dtype, list(tensor.shape)) for name, tensor in tensors.items()}
    bound = header_room(largest, {"format": "pt"})
    path = tmp_path / "w.safetensors"
    stream = StreamedTensors(path, root=tmp_path, room=bound if room == "bound" else 16, metadata={"format": "pt"})
    for name, tensor in tensors.items():
        stream.add(name, tensor)
    stream.finish()
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # a header that outgrew its room: moved
    length = _header_length(path)
    assert length % 8 == 0 and json.loads(path.read_bytes()[8 : 8 + length])["m0.float32"]["data_offsets"][0] == 0
    # All tensors at their largest shapes: the header is the bound's length, in its room or moved.
    data = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    assert length == bound and path.stat().st_size == 8 + length + data


def test_the_room_holds_the_header_of_any_subset_at_smaller_shapes(tmp_path):
    largest = {f"layers.{i}.lora_A.weight": (torch.bfloat16, [128, 11008]) for i in range(40)}
    room = header_room(largest, {"format": "pt"})
    path = tmp_path / "w.safetensors"
    stream = StreamedTensors(path, root=tmp_path, room=room, metadata={"format": "pt"})
    for i in range(0, 40, 3):
        stream.add(f"layers.{i}.lora_A.weight", torch.zeros(1 + i, 3, dtype=torch.bfloat16))
    stream.finish()
    assert _header_length(path) == room and len(load_file(path)) == 14


def test_the_writer_keeps_no_tensor_and_refuses_a_name_twice(tmp_path):
    stream = StreamedTensors(tmp_path / "w.safetensors", root=tmp_path)
    tensor = torch.ones(1000)
    alive = weakref.ref(tensor)
    stream.add("a", tensor)
    del tensor
    gc.collect()
    assert alive() is None  # on disk only: a merge's memory does not grow with the modules saved
    with pytest.raises(ValueError, match="'a' is already"):
        stream.add("a", torch.zeros(2))


def test_an_empty_file_is_valid(tmp_path):
    stream = StreamedTensors(tmp_path / "w.safetensors", root=tmp_path)
    stream.finish()
    assert load_file(tmp_path / "w.safetensors") == {}


def test_a_path_outside_the_root_is_refused_before_anything_is_written(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(OutputError):
        StreamedTensors(tmp_path / "elsewhere.safetensors", root=root)
    assert not (tmp_path / "elsewhere.safetensors").exists()
