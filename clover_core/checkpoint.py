"""Safetensors save / load of pruned models. No pickle is ever written or read.

A checkpoint is a standard ``save_pretrained`` folder whose ``config.json`` carries a ``clover``
entry (method, mode, target and every head's kept rank). Loading rebuilds the original architecture
from the config, shrinks its attention modules to the recorded ranks, and loads the weights strictly.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.initialization import no_init_weights

from .adapters import adapter_for, is_rank_major
from .attention import padded_width
from .model_card import CARD, model_card
from .prune import FORMAT, attach_ranks, build_module, pruning_record, record, set_submodule, zero_padding
from .remote import base_class, export_code

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHT_NAMES = ("model", "diffusion_pytorch_model")  # transformers, diffusers


def save_pruned(model: nn.Module, out_dir: str | os.PathLike, *, processor=None, dtype: torch.dtype | None = None,
                max_shard_size: str = "2GB") -> Path:
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
    if out.parent.is_dir():
        _remove_stale_temporaries(out)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
    try:
        _save_weights(model, tmp, dtype, max_shard_size)
        _save_processor(processor, tmp)
        auto_map = export_code(model, tmp)
        _update_config(tmp, auto_map, dtype)
        (tmp / CARD).write_text(model_card(model, meta, out.name, auto_map, dtype))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved pruned model to %s", out)
    return out


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


def _save_processor(processor, folder: Path) -> None:
    if processor is None:
        return
    diffusers = sys.modules.get("diffusers")  # a pipeline can only exist once diffusers is imported
    if diffusers is not None and isinstance(processor, diffusers.DiffusionPipeline):
        log.warning("processor is a %s: only the pruned UNet is saved, not the pipeline's other components; "
                    "load the base pipeline and pass unet= (see the folder's README.md)", type(processor).__name__)
        return
    processor.save_pretrained(folder)


def _update_config(folder: Path, auto_map: dict[str, str], dtype: torch.dtype | None) -> None:
    """Point ``config.json`` at the modeling code, and record the saved dtype (transformers reads it)."""
    config = read_config(folder)
    config.pop("auto_map", None)
    if auto_map:
        config["auto_map"] = auto_map
    if dtype is not None and "dtype" in config:
        config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_checkpoint(out):
        raise FileExistsError(f"{out} is not empty and is not a CLOVER checkpoint; refusing to overwrite it")


def _replace(tmp: Path, out: Path) -> None:
    """Swap ``tmp`` into place: at every instant either the old folder or the new one exists.

    An existing folder is exchanged with ``tmp`` in one atomic ``renameat2(RENAME_EXCHANGE)`` where the
    system offers it (Linux); elsewhere the old folder is first renamed aside, and a save killed between
    the two renames leaves it there (``.<name>.old-<pid>``), never a half-written folder. ``tmp`` first
    gets the permissions of a folder made in place (see :func:`_umask_permissions`).
    """
    _umask_permissions(tmp)
    if out.exists() and _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def umask_modes(folder: Path) -> tuple[int, int]:
    """The permission bits ``mkdir`` and ``open`` give a new folder and file in ``folder`` under this
    process's umask, read off a probe of each: setting the umask to read it and restoring it would
    change it for other threads creating files meanwhile."""
    probe = Path(folder) / f".umask-probe-{os.getpid()}-{threading.get_ident()}"
    probe.mkdir()
    dirs = probe.stat().st_mode & 0o777  # 0o777 & ~umask
    probe.rmdir()
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    files = probe.stat().st_mode & 0o777  # 0o666 & ~umask
    probe.unlink()
    return dirs, files


def _umask_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions of :func:`umask_modes`
    (``tempfile.mkdtemp`` makes it owner-only, and safetensors its files too), so a published checkpoint
    is as readable as any folder its user makes."""
    dirs, files = umask_modes(folder)
    for root, _, names in os.walk(folder):
        os.chmod(root, dirs)
        for name in names:
            os.chmod(os.path.join(root, name), files)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system cannot (then nothing changed)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):  # kernel or file system without it
        return False
    raise OSError(code, f"cannot swap {a} into {b}: {os.strerror(code)}")


def _remove_stale_temporaries(out: Path) -> None:
    """Clean up after a save into ``out`` that was killed (its process is gone): remove its half-written
    ``.<name>.<pid>.*`` folder, and put back an old checkpoint it had renamed aside (``.<name>.old-<pid>``)."""
    prefix = f".{out.name}."
    for entry in out.parent.iterdir():
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        rest = entry.name[len(prefix):]
        pid = rest.removeprefix("old-") if rest.startswith("old-") else rest.split(".")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if rest.startswith("old-") and not out.exists():
            os.replace(entry, out)
            log.warning("restored %s, which an interrupted save had renamed aside", out)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a CLOVER checkpoint (a config.json with a ``clover`` entry)."""
    try:
        return isinstance(read_config(Path(folder)).get("clover"), dict)
    except (OSError, ValueError):
        return False


def read_config(folder: Path) -> dict:
    """The folder's ``config.json`` as a dict; a clear error if it is missing or not JSON."""
    path = folder / CONFIG
    if not path.is_file():
        raise ValueError(f"{folder} is not a model folder: {CONFIG} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is corrupted") from None


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    """Restore ``generation_config.json`` (Whisper's language/task ids, suppressed tokens) when saved."""
    if (folder / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)


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
        raise ValueError(f"{folder / CONFIG} is not a CLOVER checkpoint (no 'clover' entry of format {FORMAT}); "
                         "load ordinary models with clover_core.load_model")
    model = _skeleton(folder, raw, meta)
    _load_weights(model, folder)
    record(model, meta)
    _load_generation_config(model, folder)
    return (model if dtype is None else cast_model(model, dtype)).eval()


def _skeleton(folder: Path, raw: dict, meta: dict) -> nn.Module:
    model = _empty_model(folder, raw)
    recorded = meta.get("ranks", {})
    if not isinstance(recorded, dict):
        raise ValueError(f"{folder / CONFIG}: clover.ranks is a {type(recorded).__name__}, not a mapping of "
                         "module -> ranks; the checkpoint was tampered with")
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
        raise ValueError(f"{where} name pairs {pairs}, but the module has {sorted(factors)}; "
                         "the checkpoint was tampered with or mixed up")
    for pair, (a, _) in factors.items():
        heads, head_dim = a.shape[0], a.shape[-1]
        values = ranks[pair]
        if (not isinstance(values, list) or len(values) != heads
                or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= head_dim for r in values)):
            raise ValueError(f"{where} ({pair}) are {values!r}; expected {heads} integers in 0..{head_dim}; "
                             "the checkpoint was tampered with or mixed up")


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
        raise ValueError(f"{folder / CONFIG} names architecture {arch} but model_type {raw.get('model_type')!r} "
                         f"(expected {model_type!r}); the checkpoint was tampered with or mixed up")
    try:
        with no_init_weights():
            return cls(cls.config_class.from_dict(raw))
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as e:
        raise ValueError(f"{folder / CONFIG} does not describe a valid {arch} ({e}); "
                         "the checkpoint was tampered with or mixed up") from None


def is_diffusers_config(raw: dict) -> bool:
    """Whether a ``config.json`` describes one diffusers model (it names its ``_class_name``; a
    transformers config has a ``model_type``), such as a pipeline's ``unet/``."""
    return "_class_name" in raw and "model_type" not in raw


def diffusers_class(folder: Path, class_name: object) -> type[nn.Module]:
    """The diffusers model class a folder's ``config.json`` names in ``_class_name`` (or the library
    class a shipped CLOVER class extends).

    Raises:
        ValueError: the name is not a diffusers model class.
    """
    import diffusers

    cls = (getattr(diffusers, class_name, None) or base_class(class_name)) if isinstance(class_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{folder / CONFIG} names _class_name={class_name!r}, which is not a diffusers model class")
    return cls


def diffusers_from_config(folder: Path, raw: dict, hint: str = "") -> nn.Module:
    """The diffusers model ``raw`` (a folder's ``config.json``) describes, built from the config alone
    (on the current default device: ``meta`` for a skeleton).

    Raises:
        ValueError: not a diffusers model class, or a config the class rejects (``hint`` ends the message).
    """
    cls = diffusers_class(folder, raw["_class_name"])
    try:
        return cls.from_config({k: v for k, v in raw.items() if k != "clover"})
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as e:
        raise ValueError(f"{folder / CONFIG} does not describe a valid {raw['_class_name']} ({e}){hint}") from None


def _submodule(model: nn.Module, name: str, folder: Path) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{folder / CONFIG} lists ranks for {name!r}, which the model does not have") from None


def unreadable(path: Path, error: Exception) -> ValueError:
    """The error for a file safetensors cannot read (a checkpoint's weights or shard, an adapter)."""
    return ValueError(f"{path} cannot be read as safetensors ({error}); the file is corrupted or truncated")


def _load_weights(model: nn.Module, folder: Path) -> None:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder).files:
        try:
            state.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise unreadable(path, e) from None
    tie = getattr(model, "tie_weights", lambda: None)
    tie()  # tied parameters are stored once
    required = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()
                                                            if n in model.state_dict()}
    missing, unexpected = sorted(required - state.keys()), sorted(state.keys() - model.state_dict().keys())
    if missing or unexpected:
        raise ValueError(f"{folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    expected = model.state_dict()
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{folder}: tensor {key} has shape {tuple(tensor.shape)} but the config implies "
                             f"{tuple(expected[key].shape)}; the checkpoint was tampered with or mixed up")
    model.load_state_dict(state, strict=False, assign=True)
    tie()


@dataclass(frozen=True)
class WeightFiles:
    """A folder's safetensors weights: ``stem`` (``model``, or ``diffusion_pytorch_model`` for diffusers),
    ``variant`` (``fp16`` for ``diffusion_pytorch_model.fp16.safetensors``, None for plain names) and
    ``files``: the single file, or the shards its index lists."""

    stem: str
    variant: str | None
    files: list[Path]


def weight_files(folder: Path) -> WeightFiles:
    """Where ``folder``'s weights are: ``{stem}.safetensors`` or the shards of
    ``{stem}.safetensors.index.json``, or, in a folder holding only one variant of them (see
    :func:`weights_variant`), ``{stem}.{variant}.safetensors`` or ``{stem}.safetensors.index.{variant}.json``.

    Raises:
        ValueError: no weights, several variants and no plain weights, or a broken index.
    """
    variant = weights_variant(folder)
    single, index = (f".{variant}.safetensors", f".safetensors.index.{variant}.json") if variant else \
        (".safetensors", ".safetensors.index.json")
    for stem in WEIGHT_NAMES:
        if (folder / f"{stem}{single}").is_file():
            return WeightFiles(stem, variant, [folder / f"{stem}{single}"])
    stem = next((s for s in WEIGHT_NAMES if (folder / f"{s}{index}").is_file()), None)
    if stem is None:
        raise ValueError(f"{folder} holds no model.safetensors or diffusion_pytorch_model.safetensors (or their "
                         "index); CLOVER reads safetensors checkpoints")
    path = folder / f"{stem}{index}"
    try:
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{path} is not a valid safetensors index ({e})") from None
    return WeightFiles(stem, variant, [folder / s for s in shards])


# A variant's weights: diffusion_pytorch_model.fp16.safetensors, or the index of its shards
# (diffusion_pytorch_model.safetensors.index.fp16.json), as save_pretrained(variant="fp16") names them.
_VARIANT_FILE = re.compile(r"(?:model|diffusion_pytorch_model)"
                           r"(?:\.safetensors\.index\.([\w-]+)\.json|\.([\w-]+)\.safetensors)")
_SHARD = re.compile(r".*-\d+-of-\d+")  # diffusion_pytorch_model.fp16-00001-of-00003.safetensors: a shard


def weights_variant(folder: str | os.PathLike) -> str | None:
    """The variant of the weights in ``folder`` when it holds only variant files (``fp16`` for a
    ``diffusion_pytorch_model.fp16.safetensors`` alone, as SDXL's UNet downloaded with
    ``variant="fp16"`` is), else None (plain weights, or none at all).

    Raises:
        ValueError: several variants and no plain weights: which one to read is the user's choice.
    """
    folder = Path(folder)
    plain = [f"{stem}{suffix}" for stem in WEIGHT_NAMES for suffix in (".safetensors", ".safetensors.index.json")]
    if any((folder / name).is_file() for name in plain) or not folder.is_dir():
        return None
    names = {m[1] or m[2] for p in folder.iterdir() if (m := _VARIANT_FILE.fullmatch(p.name))}
    found = sorted(v for v in names if not _SHARD.fullmatch(v))
    if len(found) > 1:
        raise ValueError(f"{folder} holds the weight variants {', '.join(found)} and no plain weights; move the "
                         "ones not to prune out of the folder")
    return found[0] if found else None
