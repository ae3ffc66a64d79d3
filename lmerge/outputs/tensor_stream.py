"""A safetensors file written tensor by tensor, so a merge never holds its whole result in memory.

A merge saved as an exact LoRA keeps every module's factors (rank up to the sum of the adapters'
ranks): for eight rank-16 adapters on every projection of a 7B Llama that is 0.6 GB in bfloat16
(1.3 GB in float32), growing with the model, which ``save_file`` would need in memory all at
once. Here each module's tensors go to the file as they are merged, after room left for the
header (names, dtypes, shapes, offsets, known only at the end); :meth:`StreamedTensors.finish`
writes the header into that room, padded with spaces. The room is a bound the caller computes
from every name and largest shape it may add (:func:`header_room`), so the data is written once
and never copied; a header that outgrows its room (a wrong bound) is written to a new file with
the data copied after it. The layout is the format's own: an 8-byte little-endian header length,
the JSON header padded with spaces (which the format allows) to a multiple of 8, then the
tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch

from lmerge.outputs.files import remove_file
from lmerge.outputs.paths import inside_root

CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
"""safetensors' dtype codes of the dtypes LoRA factors are saved in."""
_CHUNK = 1 << 22


def header_room(largest: dict[str, tuple[torch.dtype, list[int]]], metadata: dict[str, str] | None = None) -> int:
    """Bytes that the header of a file of any of the tensors ``largest`` (name: dtype and largest
    shape) with ``metadata`` can take: the header of all of them at their largest shapes and
    offsets, whose numbers have the most digits."""
    end = sum(math.prod(shape) * dtype.itemsize for dtype, shape in largest.values())
    entries = {name: (dtype, shape, [end, end]) for name, (dtype, shape) in largest.items()}
    return len(_header(entries, metadata))


class StreamedTensors:
    """Tensors appended to the safetensors file ``path`` (a new file inside ``root``) as they come,
    after ``room`` bytes left for its header (:func:`header_room`), which :meth:`finish` writes."""

    def __init__(self, path: Path, *, root: Path, room: int = 0, metadata: dict[str, str] | None = None) -> None:
        self.root = root
        self.path = inside_root(root, path)
        self.metadata = metadata
        self.room = room + -room % 8
        # Open until finish(); a failed merge removes its staging bundle, this file with it.
        self.file = open(self.path, "xb")  # noqa: SIM115
        self.file.write(bytes(8 + self.room))
        self.entries: dict[str, tuple[torch.dtype, list[int], list[int]]] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes (a CPU tensor of a dtype in :data:`CODES`) under ``name``."""
        if name in self.entries:
            raise ValueError(f"tensor {name!r} is already in the file")
        tensor = tensor.contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        self.file.write(raw)
        end = self.size + raw.nbytes
        self.entries[name] = (tensor.dtype, list(tensor.shape), [self.size, end])
        self.size = end

    def finish(self) -> None:
        """Write the header: into its room, or, if it outgrew it, at the start of a new file that
        the data is copied into and that then replaces this one."""
        header = _header(self.entries, self.metadata)
        if len(header) <= self.room:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.room) + header.ljust(self.room, b" "))
            self.file.close()
            return
        self.file.close()
        moved = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(inside_root(self.root, moved), "xb") as out, open(self.path, "rb") as data:
                out.write(struct.pack("<Q", len(header)) + header)
                data.seek(8 + self.room)
                shutil.copyfileobj(data, out, _CHUNK)
            os.replace(moved, self.path)
        finally:
            remove_file(moved, root=self.root)


def _header(entries: dict[str, tuple[torch.dtype, list[int], list[int]]], metadata: dict[str, str] | None) -> bytes:
    """The JSON header of ``entries`` (name: dtype, shape, data offsets), padded to a multiple of 8."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    for name, (dtype, shape, offsets) in entries.items():
        header[name] = {"dtype": CODES[dtype], "shape": shape, "data_offsets": offsets}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)
