"""A model folder's files: its ``config.json`` and its safetensors weights (plain, variant or sharded).

Read by :func:`~clover_core.load_model`, :func:`~clover_core.load_pruned` and the streaming prune, so
all three agree on which files a folder's weights are and on what its config describes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..architectures import base_class

CONFIG = "config.json"
WEIGHT_NAMES = ("model", "diffusion_pytorch_model")  # transformers, diffusers


def pipeline_component(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is one model of a diffusers pipeline (its parent holds ``model_index.json``)."""
    return (Path(folder).parent / "model_index.json").is_file()


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


def unreadable(path: Path, error: Exception) -> ValueError:
    """The error for a file safetensors cannot read (a checkpoint's weights or shard, an adapter)."""
    return ValueError(f"{path} cannot be read as safetensors ({error}); the file is corrupted or truncated")


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
    single, index = (
        (f".{variant}.safetensors", f".safetensors.index.{variant}.json")
        if variant
        else (".safetensors", ".safetensors.index.json")
    )
    for stem in WEIGHT_NAMES:
        if (folder / f"{stem}{single}").is_file():
            return WeightFiles(stem, variant, [folder / f"{stem}{single}"])
    stem = next((s for s in WEIGHT_NAMES if (folder / f"{s}{index}").is_file()), None)
    if stem is None:
        raise ValueError(
            f"{folder} holds no model.safetensors or diffusion_pytorch_model.safetensors (or their "
            "index); CLOVER reads safetensors checkpoints"
        )
    path = folder / f"{stem}{index}"
    try:
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{path} is not a valid safetensors index ({e})") from None
    return WeightFiles(stem, variant, [folder / s for s in shards])


# A variant's weights: diffusion_pytorch_model.fp16.safetensors, or the index of its shards
# (diffusion_pytorch_model.safetensors.index.fp16.json), as save_pretrained(variant="fp16") names them.
_VARIANT_FILE = re.compile(
    r"(?:model|diffusion_pytorch_model)"
    r"(?:\.safetensors\.index\.([\w-]+)\.json|\.([\w-]+)\.safetensors)"
)


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
        raise ValueError(
            f"{folder} holds the weight variants {', '.join(found)} and no plain weights; move the "
            "ones not to prune out of the folder"
        )
    return found[0] if found else None
