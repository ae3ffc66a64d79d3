"""Read a safetensors file tensor by tensor with plain reads, hashing the file as they pass over it.

``safe_open`` maps the whole file and parses its header on every open: per module of a merge that
is a header parse, a mapping and a page fault per 4 KiB page read, and a file held open across
modules would keep every page it has read resident. Here the file stays open as a descriptor
only; each tensor is one ``readinto`` straight into the tensor's memory. A merge reads the
modules in the file's own order (safetensors lays tensors out sorted by name, as lmerge lists the
modules), so the SHA-256 the run records is computed from the same bytes on the way, and only
what no read covered (the header, heads, modules left out) is read again for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
"""The safetensors dtypes LoRA factors come in (and that this reader reads; others: ``safe_open``)."""
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Entry:
    """Where a tensor's bytes are in the file (absolute offsets), its dtype code and shape."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_entries(path: str | os.PathLike[str]) -> dict[str, Entry]:
    """The tensors of a safetensors file whose header ``safe_open`` has already accepted."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    base = 8 + length
    return {
        name: Entry(info["dtype"], tuple(info["shape"]), base + info["data_offsets"][0], base + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }


class FileDigest:
    """A SHA-256 of a file computed in order as its bytes go by: ``covered`` bytes so far."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.covered = 0

    def finish(self, handle) -> str:  # noqa: ANN001 - a binary file object
        """Hash the rest of the file from ``handle`` (positioned anywhere) and return the hex digest."""
        self.skip_to(handle, os.fstat(handle.fileno()).st_size)
        return self.sha.hexdigest()

    def skip_to(self, handle, position: int) -> None:  # noqa: ANN001
        """Hash the bytes from ``covered`` up to ``position`` that no tensor read passed over."""
        handle.seek(self.covered)
        while self.covered < position:
            chunk = handle.read(min(_CHUNK, position - self.covered))
            if not chunk:
                raise EOFError(f"file ends at {self.covered}, before {position}")
            self.sha.update(chunk)
            self.covered += len(chunk)


def read_tensor(handle, entry: Entry, digest: FileDigest) -> torch.Tensor:  # noqa: ANN001
    """The tensor ``entry`` read from ``handle`` (an unbuffered binary file) into fresh memory
    (writable, the caller's own); its bytes go into ``digest`` when they are the next it needs."""
    size = entry.end - entry.start
    tensor = torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
    if size != tensor.numel() * tensor.element_size():
        raise EOFError(f"{size} bytes for a {entry.dtype} tensor of shape {list(entry.shape)}")
    if size == 0:
        return tensor
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    hashed = entry.start >= digest.covered
    if hashed:
        digest.skip_to(handle, entry.start)
    handle.seek(entry.start)
    done = 0
    while done < size:  # a raw read may return less than asked
        count = handle.readinto(view[done:])
        if not count:
            raise EOFError(f"file ends inside the tensor at {entry.start + done}")
        done += count
    if hashed:
        digest.sha.update(view)
        digest.covered = entry.end
    return tensor
