"""Safetensors files read and written one tensor at a time, never whole: what lets the streaming
prune (:mod:`.stream`) handle checkpoints larger than memory.

Tensors are read from the shards straight into their own buffers (no whole-shard loads, no memory maps
whose pages would stay resident), and written one at a time into output shards whose headers are
filled in last.
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .weights import unreadable, weight_files

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


CHUNK = 16 * 2**20  # bytes copied at a time when a tensor passes through unchanged


@dataclass(frozen=True)
class StoredTensor:
    """A tensor still on disk: which file, where, and what it is."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def load(self) -> torch.Tensor:
        """The tensor, read into a fresh buffer of its own (plain file reads, no memory map)."""
        tensor = torch.empty(self.shape, dtype=self.dtype)
        if self.nbytes:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != self.nbytes:
                    raise ValueError(f"{self.path} is truncated: a tensor is incomplete")
        return tensor

    def chunks(self) -> Iterator[bytes]:
        """The raw bytes, a chunk at a time."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for start in range(0, self.nbytes, CHUNK):
                chunk = f.read(min(CHUNK, self.nbytes - start))
                if len(chunk) != min(CHUNK, self.nbytes - start):
                    raise ValueError(f"{self.path} is truncated: a tensor is incomplete")
                yield chunk


class SafetensorsFile:
    """One ``.safetensors`` file: its header, and where each tensor's bytes are."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, ValueError) as e:
            raise unreadable(path, e) from None
        header.pop("__metadata__", None)
        self.start = 8 + size
        self.entries = {k: (DTYPES[v["dtype"]], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in header.items()}
        end = self.start + max((e[2][1] for e in self.entries.values()), default=0)
        if path.stat().st_size < end:
            raise ValueError(f"{path} is truncated: {path.stat().st_size} bytes, its header needs {end}")

    def stored(self, key: str) -> StoredTensor:
        dtype, shape, (begin, end) = self.entries[key]
        return StoredTensor(self.path, self.start + begin, end - begin, dtype, shape)


class Checkpoint:
    """The safetensors shards of a checkpoint folder, addressed by tensor name; ``stem`` is the weight
    files' name (``model``, or ``diffusion_pytorch_model`` for diffusers). A folder holding only a variant
    of its weights (``diffusion_pytorch_model.fp16.safetensors``) is read from those; the output gets
    plain names."""

    def __init__(self, folder: Path):
        weights = weight_files(folder)
        self.stem = weights.stem
        self.files = [SafetensorsFile(path) for path in weights.files]
        self.where = {key: f for f in self.files for key in f.entries}

    def stored(self, key: str) -> StoredTensor:
        return self.where[key].stored(key)

    def float_dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (the most common one)."""
        counts: dict[torch.dtype, int] = {}
        for f in self.files:
            for dtype, _, _ in f.entries.values():
                if dtype.is_floating_point:
                    counts[dtype] = counts.get(dtype, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    def largest_shard_bytes(self) -> int:
        return max(f.path.stat().st_size for f in self.files)


class ShardWriter:
    """Writes ``.safetensors`` shards tensor by tensor: the data first, behind a header slot reserved
    for every tensor name the model has, then the header (padded with spaces, as safetensors allows)."""

    def __init__(self, folder: Path, max_bytes: int, reserve: int, stem: str = "model"):
        self.folder, self.max_bytes, self.reserve, self.stem = folder, max_bytes, reserve, stem
        self.shards: list[tuple[Path, dict]] = []
        self.file = None

    def add(self, tensors: dict[str, torch.Tensor | StoredTensor]) -> None:
        """Append one unit (tensors that belong together); a new shard starts when it would overflow.
        A :class:`StoredTensor` is copied from its file a chunk at a time, never loaded whole."""
        size = sum(nbytes(t) for t in tensors.values())
        if self.file is None or (self.offset > 0 and self.offset + size > self.max_bytes):
            self._start()
        for key, t in tensors.items():
            if isinstance(t, StoredTensor):
                for chunk in t.chunks():
                    self.file.write(chunk)
            else:
                self.file.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            self.header[key] = {
                "dtype": NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [self.offset, self.offset + nbytes(t)],
            }
            self.offset += nbytes(t)

    def _start(self) -> None:
        self._finish()
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        self.file, self.offset, self.header = open(path, "wb"), 0, {"__metadata__": {"format": "pt"}}
        self.file.write(b"\0" * (8 + self.reserve))
        self.shards.append((path, self.header))

    def _finish(self) -> None:
        if self.file is None:
            return
        text = json.dumps(self.header, separators=(",", ":")).encode()
        if len(text) > self.reserve:
            raise RuntimeError(f"safetensors header of {len(text)} bytes overflows its {self.reserve}-byte slot")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.reserve) + text + b" " * (self.reserve - len(text)))
        self.file.close()
        self.file = None

    def abort(self) -> None:
        """Close the shard being written, after a failure (the caller removes the folder)."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def close(self) -> dict[str, str]:
        """Finish the last shard, give the shards their final names; returns the weight map."""
        self._finish()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.folder / f"{self.stem}.safetensors")
            return {}
        weight_map, total = {}, 0
        for i, (path, header) in enumerate(self.shards):
            name = f"{self.stem}-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            path.rename(self.folder / name)
            for key, entry in header.items():
                if key != "__metadata__":
                    weight_map[key] = name
                    total += entry["data_offsets"][1] - entry["data_offsets"][0]
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / f"{self.stem}.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
        return weight_map


def release_freed_memory() -> None:
    """Give the pages of freed tensors back to the OS. glibc serves blocks under its adaptive mmap
    threshold (up to 32 MB: one GPT-2 XL ``c_attn`` is 31 MB) from the heap and keeps them resident
    when freed; ``malloc_trim`` releases them, so the peak stays one module's worth above the floor."""
    if _TRIM is not None:
        _TRIM(0)


def _libc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on musl
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def nbytes(t: torch.Tensor | StoredTensor) -> int:
    return t.nbytes if isinstance(t, StoredTensor) else t.numel() * t.element_size()
