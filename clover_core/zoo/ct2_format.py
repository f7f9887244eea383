"""The CTranslate2 ``model.bin`` file format, read without ctranslate2 (streaming, from one file or its parts).

The file format (little-endian; a string is ``u16 length incl. NUL + UTF-8 + NUL``)::

    u32 binary_version | str spec_name | u32 spec_revision          (name and revision: version >= 2)
    u32 n_variables, then per variable, sorted by name:
        str name | u8 rank | rank x u32 dim | u8 dtype | u32 nbytes | nbytes of raw data
    u32 n_aliases, then per alias: str alias | str target           (version >= 3)

Rank-0 variables are configuration scalars (``encoder/num_heads``). Fused projections are split into
transformers' separate ``q/k/v`` linears; the float16 weights become float32.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_BINARY_VERSION = 6
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
# Scalars of a WhisperSpec that transformers' Whisper hard-codes: (value it needs, what it means).


class CT2FormatError(ValueError):
    """A ``model.bin`` that is truncated, corrupt, or of another spec; the message names the file."""


@dataclass(frozen=True)
class CT2Model:
    """The parsed contents of a CTranslate2 ``model.bin``; ``variables`` include the aliases."""

    source: str
    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray] = field(repr=False)
    aliases: dict[str, str] = field(default_factory=dict)


class _PartsReader:
    """Reads one or more files as one byte stream (a ``model.bin`` shipped in parts), without a joined copy."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self.source = " + ".join(str(p) for p in self.paths)
        self.total = sum(p.stat().st_size for p in self.paths)
        self.offset, self._index = 0, 0
        self._file = open(self.paths[0], "rb")  # noqa: SIM115 - closed in close()

    def read(self, n: int, what: str) -> bytearray:
        """Exactly ``n`` bytes, or a :class:`CT2FormatError` saying what was being read."""
        if n > self.total - self.offset:
            raise CT2FormatError(
                f"{self.source} is truncated or corrupt: {what} needs {n} bytes at offset "
                f"{self.offset}, but only {self.total - self.offset} remain"
            )
        buf = bytearray(n)
        view, done = memoryview(buf), 0
        while done < n:
            got = self._file.readinto(view[done:])
            if not got:  # this part is exhausted: continue in the next one
                self._file.close()
                self._index += 1
                self._file = open(self.paths[self._index], "rb")  # noqa: SIM115
            done += got or 0
        self.offset += n
        return buf

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.read(self.unpack("H", what), what)
        if not raw or raw[-1] != 0:
            raise CT2FormatError(f"{self.source} is corrupt: {what} at offset {self.offset} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CT2FormatError(f"{self.source} is corrupt: {what} at offset {self.offset} is not UTF-8") from None

    def close(self) -> None:
        self._file.close()


def model_paths(path_or_parts: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    parts = [path_or_parts] if isinstance(path_or_parts, (str, os.PathLike)) else list(path_or_parts)
    paths = [Path(p) / "model.bin" if Path(p).is_dir() else Path(p) for p in parts]
    if not paths:
        raise ValueError("path_or_parts is empty; pass a model.bin, its folder, or its parts in order")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"CTranslate2 model file {missing[0]} does not exist")
    return paths


def read_ct2_model(path_or_parts: str | os.PathLike | Sequence[str | os.PathLike]) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` (a file, its folder, or its parts in order), streaming.

    Returns:
        A :class:`CT2Model`; arrays keep the file's dtype (bfloat16 becomes float32), scalars are 0-d.

    Raises:
        FileNotFoundError: a path does not exist.
        CT2FormatError: the data is truncated, corrupt, trailed by extra bytes, or of a newer format version.
    """
    reader = _PartsReader(model_paths(path_or_parts))
    try:
        version = reader.unpack("I", "the binary version")
        if not 1 <= version <= MAX_BINARY_VERSION:
            raise CT2FormatError(
                f"{reader.source} is not a CTranslate2 model.bin this reader knows: binary "
                f"version {version} (supported: 1..{MAX_BINARY_VERSION})"
            )
        spec, revision = ("", 1) if version < 2 else (reader.string("the spec name"), reader.unpack("I", "revision"))
        variables = {}
        for i in range(reader.unpack("I", "the variable count")):
            name, array = _read_variable(reader, i)
            variables[name] = array
        aliases = {}
        for _ in range(reader.unpack("I", "the alias count") if version >= 3 else 0):
            alias, target = reader.string("an alias name"), reader.string("an alias target")
            if target not in variables:
                raise CT2FormatError(f"{reader.source} is corrupt: alias {alias!r} names a missing {target!r}")
            aliases[alias], variables[alias] = target, variables[target]
        if reader.offset != reader.total:
            raise CT2FormatError(
                f"{reader.source} is corrupt: {reader.total - reader.offset} unexpected bytes "
                f"after the last entry (parts joined in the wrong order?)"
            )
    finally:
        reader.close()
    return CT2Model(reader.source, version, spec, revision, variables, aliases)


def _read_variable(reader: _PartsReader, index: int) -> tuple[str, np.ndarray]:
    name = reader.string(f"the name of variable {index}")
    rank = reader.unpack("B", f"the rank of {name!r}")
    if rank > 8:
        raise CT2FormatError(f"{reader.source} is corrupt: variable {name!r} has rank {rank}")
    shape = tuple(reader.unpack("I", f"the shape of {name!r}") for _ in range(rank))
    code = reader.unpack("B", f"the dtype of {name!r}")
    if code not in _DTYPES:
        raise CT2FormatError(f"{reader.source} is corrupt: variable {name!r} has unknown dtype code {code}")
    nbytes = reader.unpack("I", f"the size of {name!r}")
    itemsize = 2 if code == 5 else np.dtype(_DTYPES[code]).itemsize
    if nbytes != int(np.prod(shape, dtype=np.int64)) * itemsize:
        raise CT2FormatError(
            f"{reader.source} is corrupt: variable {name!r} of shape {shape} and dtype code "
            f"{code} declares {nbytes} bytes"
        )
    raw = reader.read(nbytes, f"the data of {name!r}")
    if code == 5:  # bfloat16: the high half of a float32
        array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        array = np.frombuffer(raw, _DTYPES[code])
    return name, array.reshape(shape)


def read_ct2(path_or_parts: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 ``model.bin`` by name, aliases included (see :func:`read_ct2_model`)."""
    return read_ct2_model(path_or_parts).variables
