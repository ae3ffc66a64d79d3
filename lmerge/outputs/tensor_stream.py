"""A safetensors file written tensor by tensor, so a merge never holds its whole result in memory.

A merge saved as an exact LoRA keeps every module's factors (rank up to the sum of the adapters'
ranks): for eight rank-16 adapters on every projection of a 7B Llama that is 0.6 GB in bfloat16
(1.3 GB in float32), growing with the model, which ``save_file`` would need in memory all at
once. Here each module's tensors go to a data file beside the output as they are merged;
:meth:`StreamedTensors.finish` then writes the safetensors file, its header (names, dtypes,
shapes, offsets, known only at the end) followed by that data, and removes the data file. The
layout is the format's own: an 8-byte little-endian header length, the JSON header padded with
spaces to a multiple of 8, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from lmerge.outputs.files import remove_file
from lmerge.outputs.paths import inside_root

CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
"""safetensors' dtype codes of the dtypes LoRA factors are saved in."""
_CHUNK = 1 << 22


class StreamedTensors:
    """Tensors appended to ``data`` (a new file inside ``root``) as they come, then assembled into a
    safetensors file."""

    def __init__(self, data: Path, *, root: Path) -> None:
        self.root = root
        self.data_path = inside_root(root, data)
        # Open until finish(); a failed merge removes its staging bundle, this file with it.
        self.data = open(self.data_path, "xb")  # noqa: SIM115
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes (a CPU tensor of a dtype in :data:`CODES`) under ``name``."""
        if name in self.entries:
            raise ValueError(f"tensor {name!r} is already in the file")
        tensor = tensor.contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        self.data.write(raw)
        end = self.size + raw.nbytes
        shape = list(tensor.shape)
        self.entries[name] = {"dtype": CODES[tensor.dtype], "shape": shape, "data_offsets": [self.size, end]}
        self.size = end

    def finish(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        """Write the safetensors file ``path`` (a new file inside the root) and remove the data file."""
        self.data.close()
        header = {"__metadata__": metadata, **self.entries} if metadata else dict(self.entries)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(inside_root(self.root, path), "xb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(encoded)) + encoded)
            shutil.copyfileobj(data, out, _CHUNK)
        remove_file(self.data_path, root=self.root)
