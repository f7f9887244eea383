"""Safetensors save / load of pruned models. No pickle is ever written or read.

A checkpoint is a standard ``save_pretrained`` folder whose ``config.json`` carries a ``clover``
entry (method, mode, target and every head's kept rank). Loading rebuilds the original architecture
from the config, shrinks its attention modules to the recorded ranks, and loads the weights strictly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.initialization import no_init_weights

from ..architectures import adapter_for, base_class, export_code, is_rank_major, padded_width
from ..prune import attach_ranks, build_module, set_submodule, zero_padding
from ..record import FORMAT, pruning_record, record
from .model_card import CARD, model_card
from .publish import publish_folder, sweep_stale_temporaries
from .weights import CONFIG, diffusers_from_config, is_checkpoint, read_config, unreadable, weight_files

log = logging.getLogger(__name__)


def save_pruned(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    processor=None,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Write a pruned model to ``out_dir`` atomically (a temporary folder, then a rename), as a folder
    ready for the Hugging Face Hub: safetensors weights, ``config.json`` with the CLOVER record, the
    processor's files, a ``README.md`` model card, and self-contained modeling code that
    ``config.json``'s ``auto_map`` points at, so ``from_pretrained(..., trust_remote_code=True)``
    loads it without clover_core (GPT-2, Llama, Whisper, diffusers UNet).

    Args:
        model: a model returned by :func:`clover_core.prune` (its config carries ``clover``).
        out_dir: target folder; it must not exist, be empty, or hold an earlier CLOVER checkpoint.
        processor: optional tokenizer / processor saved beside the weights (a diffusers pipeline's
            other components are not written: the folder holds the UNet, the card names the base).
        dtype: cast the saved weights (e.g. ``torch.float16``); default: the model's dtype.
        max_shard_size: shard the safetensors above this size.

    Returns:
        The folder written.

    Raises:
        ValueError: the model is not a pruned model, or ``dtype`` is not floating point.
        FileExistsError: ``out_dir`` holds something that is not a CLOVER checkpoint.
        OSError: the disk is full or not writable; ``out_dir`` is left as it was (the old checkpoint or nothing).
    """
    meta = pruning_record(model)
    if meta is None:
        raise ValueError("save_pruned expects a model returned by clover_core.prune (no config.clover found)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; use torch.float16/bfloat16/float32")
    out = Path(out_dir)
    sweep_stale_temporaries(out)  # an old checkpoint a killed save renamed aside is put back first
    check_target(out)
    with publish_folder(out) as tmp:
        _save_weights(model, tmp, dtype, max_shard_size)
        save_processor(processor, tmp)
        finish_folder(model, meta, tmp, out.name, dtype)
    log.info("saved pruned model to %s", out)
    return out


def finish_folder(model: nn.Module, meta: dict, folder: Path, name: str, dtype: torch.dtype | None) -> None:
    """What every checkpoint folder gets beside its weights and config: the modeling code its
    ``config.json`` then points at (with the saved dtype), and the ``README.md`` model card."""
    auto_map = export_code(model, folder)
    update_config(folder, auto_map, dtype)
    (folder / CARD).write_text(model_card(model, meta, name, auto_map, dtype))


def _save_weights(model: nn.Module, folder: Path, dtype: torch.dtype | None, max_shard_size: str) -> None:
    with _head_major(model):
        _save_owned(model, folder, dtype, max_shard_size)


@contextlib.contextmanager
def _head_major(model: nn.Module):
    """A model re-pruned in place (:class:`~clover_core.Slider`, ``share_weights=True``) holds rank-major
    attention modules whose weights are views of a decomposition. While saving, each is swapped for a
    head-major copy (the layout checkpoints store, and the one the model card's code loads); the model
    is restored afterwards."""
    swapped = []
    try:
        for name, module in [(n, m) for n, m in model.named_modules() if is_rank_major(m)]:
            adapter = adapter_for(module)
            with torch.no_grad():
                ranks = module.clover_ranks  # padding zeroed on both sides (a slider zeroes one): prune()'s weights
                factors = {p: zero_padding(a, b, ranks[p]) for p, (a, b) in adapter.factors(module).items()}
                saved = build_module(module, adapter, factors, ranks)
            set_submodule(model, name, saved)
            swapped.append((name, module))
        yield
    finally:
        for name, module in swapped:
            set_submodule(model, name, module)


def _save_owned(model: nn.Module, folder: Path, dtype: torch.dtype | None, max_shard_size: str) -> None:
    if hasattr(model, "register_to_config"):  # diffusers: no state_dict argument, cast a copy
        model = model if dtype is None else cast_model(copy.deepcopy(model), dtype)
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
        return
    state = None if dtype is None else {k: v.to(dtype) for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state, max_shard_size=max_shard_size)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``; a diffusers model without modules to keep in float32 is cast by torch itself
    (diffusers' override warns that modules "should be kept in float32" even when it lists none)."""
    if hasattr(model, "register_to_config") and not getattr(model, "_keep_in_fp32_modules", None):
        return nn.Module.to(model, dtype)
    return model.to(dtype)


def save_processor(processor, folder: Path) -> None:
    if processor is None:
        return
    diffusers = sys.modules.get("diffusers")  # a pipeline can only exist once diffusers is imported
    if diffusers is not None and isinstance(processor, diffusers.DiffusionPipeline):
        log.warning(
            "processor is a %s: only the pruned UNet is saved, not the pipeline's other components; "
            "load the base pipeline and pass unet= (see the folder's README.md)",
            type(processor).__name__,
        )
        return
    processor.save_pretrained(folder)


def load_processor(name: str, local_only: bool):
    """The processor (or, failing that, the tokenizer) saved with a model, or None when there is none
    (a warning names why each was refused)."""
    from transformers import AutoProcessor, AutoTokenizer

    reasons = []
    for auto in (AutoProcessor, AutoTokenizer):
        try:
            processor = auto.from_pretrained(name, local_files_only=local_only)
        except (OSError, ValueError, KeyError, TypeError) as e:
            reasons.append(f"{auto.__name__}: {e}")
            continue
        if getattr(processor, "vocab_size", None) == 0:  # built from the config alone: no vocabulary files
            reasons.append(f"{auto.__name__}: the folder holds no vocabulary")
            continue
        return processor
    log.warning("no tokenizer or processor found for %s (%s)", name, "; ".join(reasons))
    return None


def update_config(folder: Path, auto_map: dict[str, str], dtype: torch.dtype | None) -> None:
    """Point ``config.json`` at the modeling code, and record the saved dtype (transformers reads it)."""
    config = read_config(folder)
    config.pop("auto_map", None)
    if auto_map:
        config["auto_map"] = auto_map
    if dtype is not None and "dtype" in config:
        config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_checkpoint(out):
        raise FileExistsError(f"{out} is not empty and is not a CLOVER checkpoint; refusing to overwrite it")


def load_pruned(folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a folder written by :func:`save_pruned` (no ``trust_remote_code``, no pickle).

    Args:
        folder: the checkpoint folder.
        dtype: cast the loaded model; default: the dtype the weights were saved in.

    Returns:
        The pruned model in eval mode, on the CPU.

    Raises:
        ValueError: not a CLOVER checkpoint, or a corrupted / truncated / tampered file (named).
    """
    folder = Path(folder)
    raw = read_config(folder)
    meta = raw.get("clover")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"{folder / CONFIG} is not a CLOVER checkpoint (no 'clover' entry of format {FORMAT}); "
            "load ordinary models with clover_core.load_model"
        )
    model = _skeleton(folder, raw, meta)
    _load_weights(model, folder)
    record(model, meta)
    _load_generation_config(model, folder)
    return (model if dtype is None else cast_model(model, dtype)).eval()


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    """Restore ``generation_config.json`` (Whisper's language/task ids, suppressed tokens) when saved."""
    if (folder / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)


def _skeleton(folder: Path, raw: dict, meta: dict) -> nn.Module:
    model = _empty_model(folder, raw)
    recorded = meta.get("ranks", {})
    if not isinstance(recorded, dict):
        raise ValueError(
            f"{folder / CONFIG}: clover.ranks is a {type(recorded).__name__}, not a mapping of "
            "module -> ranks; the checkpoint was tampered with"
        )
    for name, ranks in recorded.items():
        original = _submodule(model, name, folder)
        adapter = adapter_for(original)
        if adapter is None:
            raise ValueError(f"{folder / CONFIG}: {name} is not a supported attention module")
        _check_ranks(folder, name, ranks, adapter.factors(original))
        module = adapter.pruned(original, {p: padded_width(r) for p, r in ranks.items()})
        attach_ranks(module, adapter, ranks)
        set_submodule(model, name, module)
    return model


def _check_ranks(folder: Path, name: str, ranks: object, factors: dict) -> None:
    """The recorded ranks of one module: a list per pair of the module, one integer in 0..head_dim per head."""
    where = f"{folder / CONFIG}: the ranks of {name}"
    if not isinstance(ranks, dict) or set(ranks) != set(factors):
        pairs = sorted(ranks) if isinstance(ranks, dict) else type(ranks).__name__
        raise ValueError(
            f"{where} name pairs {pairs}, but the module has {sorted(factors)}; "
            "the checkpoint was tampered with or mixed up"
        )
    for pair, (a, _) in factors.items():
        heads, head_dim = a.shape[0], a.shape[-1]
        values = ranks[pair]
        if (
            not isinstance(values, list)
            or len(values) != heads
            or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= head_dim for r in values)
        ):
            raise ValueError(
                f"{where} ({pair}) are {values!r}; expected {heads} integers in 0..{head_dim}; "
                "the checkpoint was tampered with or mixed up"
            )


def _empty_model(folder: Path, raw: dict) -> nn.Module:
    """The original architecture named by the config, with uninitialized weights."""
    raw = {k: v for k, v in raw.items() if k != "auto_map"}  # the folder's remote code, not used here
    if "_class_name" in raw:  # a diffusers model
        return diffusers_from_config(folder, raw, "; the checkpoint was tampered with or mixed up")
    arches = raw.get("architectures")
    arch = arches[0] if isinstance(arches, list) and arches else None
    cls = getattr(transformers, str(arch), None) or base_class(str(arch))
    if cls is None or not hasattr(cls, "config_class"):
        raise ValueError(f"{folder / CONFIG} names architecture {arch!r}, which transformers does not provide")
    model_type = getattr(cls.config_class, "model_type", None)
    if model_type and raw.get("model_type") != model_type:
        raise ValueError(
            f"{folder / CONFIG} names architecture {arch} but model_type {raw.get('model_type')!r} "
            f"(expected {model_type!r}); the checkpoint was tampered with or mixed up"
        )
    try:
        with no_init_weights():
            return cls(cls.config_class.from_dict(raw))
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as e:
        raise ValueError(
            f"{folder / CONFIG} does not describe a valid {arch} ({e}); the checkpoint was tampered with or mixed up"
        ) from None


def _submodule(model: nn.Module, name: str, folder: Path) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{folder / CONFIG} lists ranks for {name!r}, which the model does not have") from None


def _load_weights(model: nn.Module, folder: Path) -> None:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder).files:
        try:
            state.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise unreadable(path, e) from None
    tie = getattr(model, "tie_weights", lambda: None)
    tie()  # tied parameters are stored once
    required = {n for n, _ in model.named_parameters()} | {
        n for n, _ in model.named_buffers() if n in model.state_dict()
    }
    missing, unexpected = sorted(required - state.keys()), sorted(state.keys() - model.state_dict().keys())
    if missing or unexpected:
        raise ValueError(f"{folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    expected = model.state_dict()
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{folder}: tensor {key} has shape {tuple(tensor.shape)} but the config implies "
                f"{tuple(expected[key].shape)}; the checkpoint was tampered with or mixed up"
            )
    model.load_state_dict(state, strict=False, assign=True)
    tie()
