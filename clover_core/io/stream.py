"""Prune a safetensors checkpoint that does not fit in memory, one attention module at a time.

The model exists only as a skeleton on the ``meta`` device (shapes, no weights). Tensors are read and
written one at a time (:mod:`.safetensors_files`). Each attention module is read, orthogonalized and pruned on its own, so the peak
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
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers.initialization import no_init_weights

from ..architectures import PIPELINE_PART, attention_modules, auto_class
from ..decompose import Decomposition, ModuleDecomposition, PairDecomposition, decompose_module, with_progress
from ..prune import PruneConfig, plan, prune_module, set_submodule
from ..record import pruning_meta, record
from ..zoo import EMBEDDED
from .checkpoint import cast_model, check_target, finish_folder, load_processor, save_processor
from .publish import publish_folder
from .safetensors_files import Checkpoint, ShardWriter, StoredTensor, release_freed_memory
from .weights import diffusers_from_config, is_diffusers_config, read_config, weight_files

log = logging.getLogger(__name__)


def streamable(name: str | os.PathLike) -> Path | None:
    """The folder ``python -m clover_core prune`` streams for ``--model name``, or None (loaded whole):
    a safetensors model folder that is not already pruned, sharded or not (GPT-2 XL ships as one
    6 GB file, SDXL's UNet as one 10 GB file): a transformers model, a diffusers model such as a
    pipeline's ``unet/``, or a diffusers pipeline, whose ``unet/`` is the only part CLOVER prunes and
    writes (its other components are never read). A hub id streams from its snapshot in the local
    Hugging Face cache when that holds every weight file needed (else it is loaded whole, which
    downloads what is missing). Anything else is loaded whole, which names what is wrong with it."""
    folder = Path(name)
    cached = not folder.is_dir()
    if cached and (str(name) in EMBEDDED or (folder := cached_snapshot(str(name))) is None):
        return None  # an offline model, or a hub id not in the cache
    if (folder / "model_index.json").is_file():
        folder = folder / PIPELINE_PART
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


def stream_prune(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config: PruneConfig,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
    base_model: str | None = None,
    progress: bool = False,
) -> tuple[Path, nn.Module]:
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
    check_target(out)
    skeleton = _skeleton(src, ckpt.float_dtype(), base_model)
    original = copy.deepcopy(skeleton)  # sizes before pruning, for the record (meta: no memory)
    stream = _Stream(skeleton, ckpt, config)
    masks = stream.global_masks(progress) if config.mode == "global" else None
    with publish_folder(out) as tmp:
        writer = ShardWriter(
            tmp, convert_file_size_to_int(max_shard_size), _header_bound(skeleton, stream.attention), ckpt.stem
        )
        try:
            for unit in stream.units(masks, progress):
                writer.add({k: _cast(v, dtype) for k, v in unit.items()})
                del unit
                release_freed_memory()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        meta = pruning_meta(original, config, stream.ranks)
        record(skeleton, meta)
        _write_folder(skeleton, src, tmp, dtype or ckpt.float_dtype())
        finish_folder(skeleton, meta, tmp, out.name, dtype)
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
        release_freed_memory()
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
        return Decomposition(
            self.skeleton,
            {
                name: ModuleDecomposition(
                    name,
                    adapter,
                    {
                        p: PairDecomposition(empty, empty, *(a.new_empty(a.shape[::2]),) * 2)
                        for p, (a, _) in adapter.factors(module).items()
                    },
                )
                for name, (module, adapter) in self.attention.items()
            },
        )

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
            scores[name] = ModuleDecomposition(
                name, adapter, {p: PairDecomposition(empty, empty, pd.s, pd.vanilla) for p, pd in md.pairs.items()}
            )
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
    import transformers

    config = transformers.AutoConfig.from_pretrained(src, local_files_only=True)
    auto = getattr(transformers, auto_class(config.model_type))
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
    if hasattr(skeleton, "register_to_config"):  # diffusers: the record is registered in its config
        skeleton.save_config(folder)
        return
    skeleton.config.dtype = str(dtype).removeprefix("torch.")
    skeleton.config.architectures = [type(skeleton).__name__]
    skeleton.config.save_pretrained(folder)
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", folder / "generation_config.json")
    save_processor(load_processor(str(src), local_only=True), folder)
