"""Prune a safetensors checkpoint that does not fit in memory, one attention module at a time.

The model exists only as a skeleton on the ``meta`` device (shapes, no weights). Tensors are read one
at a time from the shards, straight into their own buffers (no whole-shard loads, no memory maps whose
pages would stay resident), and written one at a time into the output shards, whose headers are
filled in last. Each attention module is read, orthogonalized and pruned on its own, so the peak
memory is one attention module (or the largest single tensor) plus the interpreter, whatever the
model's size. Mode ``global`` needs every head's scores before its one threshold is known: a first
pass keeps only the singular values (and vanilla scores), a second one writes. The result is the
folder :func:`clover_core.save_pruned` writes for ``clover_core.prune`` of the same model.

Checkpoints in both layouts stream: transformers (``model.safetensors``, sharded behind
``model.safetensors.index.json``) and diffusers models such as a pipeline's ``unet/``
(``diffusion_pytorch_model.safetensors`` and its index), written back in the layout they came in.
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.initialization import no_init_weights

from .adapters import attention_modules
from .checkpoint import (_check_target, _replace, _save_processor, _update_config, cast_model, diffusers_from_config,
                         is_diffusers_config, read_config, unreadable, weight_files)
from .decompose import Decomposition, ModuleDecomposition, PairDecomposition, decompose_module, with_progress
from .model_card import CARD, model_card
from .prune import PruneConfig, plan, prune_module, pruning_meta, record, set_submodule
from .remote import export_code

log = logging.getLogger(__name__)

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


def streamable(name: str | os.PathLike) -> Path | None:
    """The folder ``python -m clover_core prune`` streams for ``--model name``, or None (loaded whole):
    a safetensors model folder that is not already pruned, sharded or not (GPT-2 XL ships as one
    6 GB file, SDXL's UNet as one 10 GB file): a transformers model, a diffusers model such as a
    pipeline's ``unet/``, or a diffusers pipeline, whose ``unet/`` is the only part CLOVER prunes and
    writes (its other components are never read). A hub id streams from its snapshot in the local
    Hugging Face cache when that holds every weight file needed (else it is loaded whole, which
    downloads what is missing). Anything else is loaded whole, which names what is wrong with it."""
    from .models import EMBEDDED

    folder = Path(name)
    cached = not folder.is_dir()
    if cached and (str(name) in EMBEDDED or (folder := cached_snapshot(str(name))) is None):
        return None  # an offline model, or a hub id not in the cache
    if (folder / "model_index.json").is_file():
        folder = folder / "unet"
    try:
        raw = read_config(folder)
        files = weight_files(folder).files
    except ValueError:  # no config or no safetensors weights
        return None
    if not isinstance(raw, dict) or "clover" in raw or not (is_diffusers_config(raw) or "model_type" in raw):
        return None
    if cached and not all(path.is_file() for path in files):  # partly downloaded: loading it fetches the rest
        return None
    return folder


def cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder of hub repository ``repo_id`` (its default
    revision), or None: not a repository id, or not cached. Nothing is downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError):
        return None


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
        size = sum(_nbytes(t) for t in tensors.values())
        if self.file is None or (self.offset > 0 and self.offset + size > self.max_bytes):
            self._start()
        for key, t in tensors.items():
            if isinstance(t, StoredTensor):
                for chunk in t.chunks():
                    self.file.write(chunk)
            else:
                self.file.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            self.header[key] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                                "data_offsets": [self.offset, self.offset + _nbytes(t)]}
            self.offset += _nbytes(t)

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
        (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return weight_map


def stream_prune(src: str | os.PathLike, out: str | os.PathLike, config: PruneConfig, *,
                 dtype: torch.dtype | None = None, max_shard_size: int | str = "2GB",
                 base_model: str | None = None, progress: bool = False) -> tuple[Path, nn.Module]:
    """Prune a safetensors checkpoint folder into ``out`` without ever loading it whole.

    Args:
        src: the checkpoint folder: a transformers model (``config.json`` and ``model.safetensors`` or a
            sharded index) or a diffusers model such as a pipeline's ``unet/`` (``config.json`` naming
            its ``_class_name``, and ``diffusion_pytorch_model.safetensors`` or its index).
        out: the folder to write, atomically (same rules as :func:`clover_core.save_pruned`).
        config: what to prune and how.
        dtype: cast the written weights; default: the checkpoint's dtype.
        max_shard_size: output shard size (bytes, or a string such as ``"2GB"``).
        base_model: the hub id ``src`` is a cached snapshot of (see :func:`cached_snapshot`), recorded
            as the base model, as loading that id would; default: none (a local folder).
        progress: show progress bars (mode ``global``'s scoring pass, then the tensors written).

    Returns:
        ``(out, model)``: the folder written and the pruned model's structure on the ``meta``
        device (no weights; for sizes and parameter counts).

    Raises:
        ValueError: not a safetensors checkpoint, missing tensors, or a pair the model lacks.
        FileExistsError: ``out`` holds something that is not a CLOVER checkpoint.
    """
    from transformers.utils.hub import convert_file_size_to_int

    src, out = Path(src), Path(out)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; use torch.float16/bfloat16/float32")
    ckpt = Checkpoint(src)
    _check_target(out)
    skeleton = _skeleton(src, ckpt.float_dtype(), base_model)
    original = copy.deepcopy(skeleton)  # sizes before pruning, for the record (meta: no memory)
    stream = _Stream(skeleton, ckpt, config)
    masks = stream.global_masks(progress) if config.mode == "global" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    writer = None
    try:
        writer = ShardWriter(tmp, convert_file_size_to_int(max_shard_size), _header_bound(skeleton, stream.attention),
                             ckpt.stem)
        for unit in stream.units(masks, progress):
            writer.add({k: _cast(v, dtype) for k, v in unit.items()})
            del unit
            _release_freed_memory()
        writer.close()
        meta = pruning_meta(original, config, stream.ranks)
        record(skeleton, meta)
        _write_folder(skeleton, src, tmp, dtype or ckpt.float_dtype())
        auto_map = export_code(skeleton, tmp)
        _update_config(tmp, auto_map, dtype)
        (tmp / CARD).write_text(model_card(skeleton, meta, out.name, auto_map, dtype))
        _replace(tmp, out)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("streamed a pruned %s to %s", type(skeleton).__name__, out)
    return out, skeleton


def stream_spectra(src: str | os.PathLike, *, progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Every head's singular values of a safetensors checkpoint folder, reading and decomposing one
    attention module at a time: :func:`clover_core.spectra` of the model, without loading it.

    Args:
        src: the checkpoint folder (see :func:`stream_prune`).
        progress: show a progress bar over attention modules.

    Returns:
        ``{module name: {"qk": (n_heads, head_dim), "vo": (n_groups, head_dim)}}``, each row descending.

    Raises:
        ValueError: not a safetensors checkpoint, or missing tensors.
    """
    src = Path(src)
    ckpt = Checkpoint(src)
    stream = _Stream(_skeleton(src, ckpt.float_dtype()), ckpt, None)
    spectra = {}
    for name in with_progress(list(stream.attention), progress, "decomposing attention"):
        spectra[name] = {pair: pd.s.clone() for pair, pd in stream.decomposed(name)[1].pairs.items()}
        _release_freed_memory()
    return spectra


class _Stream:
    """The model's tensors in state-dict order, attention modules pruned one at a time (``config``:
    how; None when the modules are only decomposed)."""

    def __init__(self, skeleton: nn.Module, ckpt: Checkpoint, config: PruneConfig | None):
        self.skeleton, self.ckpt, self.config = skeleton, ckpt, config
        self.attention = {name: (module, adapter) for name, module, adapter in attention_modules(skeleton)}
        self.keys = _key_map(skeleton, ckpt)
        self.ranks: dict[str, dict[str, list[int]]] = {}
        if config is not None:
            plan(self._meta_scores(), config)  # a bad request (Q-K of a rotary model) fails before any work

    def _meta_scores(self) -> Decomposition:
        """Every module's pairs with scores of the right shapes on ``meta``: structure only."""
        empty = torch.empty(0)
        return Decomposition(self.skeleton, {
            name: ModuleDecomposition(name, adapter, {p: PairDecomposition(empty, empty, *(a.new_empty(a.shape[::2]),) * 2)
                                                      for p, (a, _) in adapter.factors(module).items()})
            for name, (module, adapter) in self.attention.items()})

    def load(self, name: str) -> nn.Module:
        """The attention module ``name`` with its weights read from the checkpoint (CPU)."""
        module = copy.deepcopy(self.attention[name][0])
        state = {k: self.ckpt.stored(self.keys[f"{name}.{k}"]).load() for k in module.state_dict()}
        module.load_state_dict(state, assign=True)
        return module

    def decomposed(self, name: str) -> tuple[nn.Module, ModuleDecomposition]:
        module = self.load(name)
        return module, decompose_module(name, module, self.attention[name][1])

    def global_masks(self, progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """First pass: every module's scores (singular values, vanilla scores), then one plan."""
        scores = {}
        for name, (_, adapter) in with_progress(list(self.attention.items()), progress, "scoring attention"):
            md = self.decomposed(name)[1]
            empty = torch.empty(0)  # the factors are not kept: the plan reads scores only
            scores[name] = ModuleDecomposition(name, adapter, {p: PairDecomposition(empty, empty, pd.s, pd.vanilla)
                                                               for p, pd in md.pairs.items()})
            log.debug("scored %s", name)
        return plan(Decomposition(self.skeleton, scores), self.config)

    def pruned(self, name: str, masks: dict | None) -> nn.Module:
        """Second pass (or the only one): the pruned module, built on the CPU from its own decomposition."""
        original, md = self.decomposed(name)
        kept = masks[name] if masks is not None else plan(Decomposition(self.skeleton, {name: md}), self.config)[name]
        module = prune_module(original, md, kept, self.config.method)
        self.ranks[name] = module.clover_ranks
        return module

    def units(self, masks: dict | None, progress: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Tensors to write, grouped: one attention module, or one other tensor, at a time."""
        done = set()
        for key in with_progress(list(self.keys), progress, "pruning and writing", unit="tensor"):
            owner = next((n for n in self.attention if key.startswith(n + ".")), None)
            if owner is None:
                yield {key: self.ckpt.stored(self.keys[key])}
            elif owner not in done:
                done.add(owner)
                module = self.pruned(owner, masks)
                yield {f"{owner}.{k}": v.detach() for k, v in module.state_dict().items()}
                set_submodule(self.skeleton, owner, module.to("meta"))  # written: keep its structure only


def _release_freed_memory() -> None:
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


def _nbytes(t: torch.Tensor | StoredTensor) -> int:
    return t.nbytes if isinstance(t, StoredTensor) else t.numel() * t.element_size()


def _cast(t: torch.Tensor | StoredTensor, dtype: torch.dtype | None) -> torch.Tensor | StoredTensor:
    """``t`` in ``dtype`` (floating-point tensors only); left on disk when nothing changes."""
    if dtype is None or not t.dtype.is_floating_point or t.dtype == dtype:
        return t
    return (t.load() if isinstance(t, StoredTensor) else t).to(dtype)


def _skeleton(src: Path, dtype: torch.dtype, hub_id: str | None = None) -> nn.Module:
    """The checkpoint's model on the ``meta`` device, as :func:`clover_core.load_model` would build it
    from the folder, or from the hub id it is a snapshot of (its config's ``_name_or_path``)."""
    name = hub_id or str(src)
    raw = read_config(src)  # a clear error if config.json is missing or broken
    if "clover" in raw:
        raise ValueError(f"{src} is already a CLOVER checkpoint; prune the original model instead")
    if is_diffusers_config(raw):  # a diffusers model, e.g. a pipeline's unet/
        with torch.device("meta"):
            model = diffusers_from_config(src, raw)
        model.register_to_config(_name_or_path=name)  # as from_pretrained records it
        return cast_model(model, dtype).eval()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSpeechSeq2Seq

    config = AutoConfig.from_pretrained(src, local_files_only=True)
    auto = AutoModelForSpeechSeq2Seq if config.model_type == "whisper" else AutoModelForCausalLM
    config._name_or_path = name
    with torch.device("meta"):
        model = auto.from_config(config)
    return model.to(dtype).eval()


def _key_map(skeleton: nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Model tensor name -> checkpoint tensor name, for every tensor the model stores (tied weights
    once, as ``save_pretrained`` writes them); checkpoints saved without the base-model prefix
    (``h.0...`` for ``transformer.h.0...``) are matched too."""
    state = skeleton.state_dict()
    stored = {n for n, _ in skeleton.named_parameters()} | {n for n, _ in skeleton.named_buffers() if n in state}
    prefix = getattr(skeleton, "base_model_prefix", "") + "."
    keys, missing = {}, []
    for name in (n for n in state if n in stored):
        found = next((k for k in (name, name.removeprefix(prefix)) if k in ckpt.where), None)
        if found is None:
            missing.append(name)
        keys[name] = found
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    return keys


def _header_bound(skeleton: nn.Module, attention: dict[str, tuple[nn.Module, object]]) -> int:
    """Bytes enough for the header of a shard holding every tensor of the pruned model: the original's
    tensors and each attention module's pruned form at full width (pruning only shrinks shapes)."""
    shapes = {n: list(t.shape) for n, t in skeleton.state_dict().items()}
    with torch.device("meta"), no_init_weights():
        for name, (module, adapter) in attention.items():
            pruned = adapter.pruned(module, {}).state_dict()
            shapes.update({f"{name}.{k}": list(t.shape) for k, t in pruned.items()})
    entries = {n: {"dtype": "BF16", "shape": shape, "data_offsets": [10**15, 10**15]} for n, shape in shapes.items()}
    return len(json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":"))) + 64


def _write_folder(skeleton: nn.Module, src: Path, folder: Path, dtype: torch.dtype) -> None:
    """config.json (with the record), generation config and processor, as ``save_pretrained`` would
    (a diffusers model: its config alone)."""
    from .models import _processor

    if hasattr(skeleton, "register_to_config"):  # diffusers: the record is registered in its config
        skeleton.save_config(folder)
        return
    skeleton.config.dtype = str(dtype).removeprefix("torch.")
    skeleton.config.architectures = [type(skeleton).__name__]
    skeleton.config.save_pretrained(folder)
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", folder / "generation_config.json")
    _save_processor(_processor(str(src), local_only=True), folder)
