"""Model families: the only code that knows a model type.

Each file here declares one :class:`Family` (its attention adapter, the modeling code its pruned
checkpoints carry, its auto class, its MLP up-projection, its unpruned KV width and its kind);
``FAMILIES`` is the one registry, and everything else in the engine asks it. Adding a family is one
new file plus one entry below (or :func:`register` at run time).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch import nn

from . import diffusers_unet, gpt2, llama, whisper
from .base import Adapter, Factors, Family, Kind, RemoteCode, grouped_kv_width, is_rank_major
from .remote.clover_attention import padded_width

log = logging.getLogger(__name__)

FAMILIES: list[Family] = [gpt2.FAMILY, whisper.FAMILY, llama.FAMILY, diffusers_unet.FAMILY]
REMOTE_DIR = Path(__file__).parent / "remote"
DEFAULT_AUTO_CLASS = "AutoModelForCausalLM"  # a model type no family declares: loaded as a language model
PIPELINE_PART = diffusers_unet.PIPELINE_PART  # the component of a diffusers pipeline that CLOVER prunes


def register(family: Family) -> None:
    """Add a family to the registry (at run time; a file here plus an entry in ``FAMILIES`` does it for good).

    Raises:
        TypeError: ``family`` is not a :class:`Family`.
        ValueError: a family of that name, or for that attention class, is registered already.
    """
    if not isinstance(family, Family):
        raise TypeError(f"family must be an architectures.Family, got {type(family).__name__}")
    for known in FAMILIES:
        if known.name == family.name or known.attention is family.attention:
            raise ValueError(f"a family for {family.name!r} ({family.attention.__name__}) is registered already")
    FAMILIES.append(family)


def unregister(name: str) -> None:
    """Remove the family ``name`` from the registry (a no-op for an unknown name)."""
    FAMILIES[:] = [f for f in FAMILIES if f.name != name]


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter for ``module``, or None when it is not a supported attention module."""
    family = family_for(module)
    return None if family is None else family.adapter


def family_for(module: nn.Module) -> Family | None:
    """The family whose attention class ``module`` is, or None."""
    return next((f for f in FAMILIES if isinstance(module, f.attention)), None)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, Adapter]]:
    """Every supported attention module of ``model``, outermost first, as ``(name, module, adapter)``.

    Raises:
        TypeError: ``model`` is not a torch module.
        NotImplementedError: the model contains no supported attention module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected a torch.nn.Module, got {type(model).__name__} {model!r:.60}; load a model "
            "first, e.g. clover_core.load_model(name).model"
        )
    found = [(name, m, a) for name, m in model.named_modules() if (a := adapter_for(m)) is not None]
    if not found:
        supported = ", ".join(f.attention.__name__ for f in FAMILIES)
        raise NotImplementedError(
            f"{type(model).__name__} has no supported attention module; supported classes: {supported}"
        )
    return found


def family_of(model: nn.Module) -> Family | None:
    """The family of ``model``: the one whose model class it is, else the one of its first supported
    attention module; None when it has none."""
    family = next((f for f in FAMILIES if f.model_class is not None and isinstance(model, f.model_class)), None)
    if family is not None:
        return family
    return next((f for m in model.modules() for f in FAMILIES if isinstance(m, f.attention)), None)


def kind_of(model: nn.Module, processor: object = None) -> Kind:
    """What ``model`` produces: ``"diffusion"`` for a diffusers model (``processor`` is then its
    pipeline, or None for a model loaded on its own), ``"speech"`` or ``"lm"``, as its family says."""
    if getattr(processor, "unet", None) is model or hasattr(model, "register_to_config"):
        return "diffusion"
    family = family_of(model)
    return family.kind if family is not None else "lm"


def auto_class(model_type: str) -> str:
    """The transformers auto class that loads a model of ``config.model_type``."""
    family = next((f for f in FAMILIES if model_type in f.model_types and f.auto_class), None)
    return DEFAULT_AUTO_CLASS if family is None else family.auto_class


def unpruned_kv_width(config: object) -> int | None:
    """K + V features one generated token adds to the cache of an unpruned model with ``config``; None
    for a model that caches nothing or a config that does not say (a family not registered is read as
    a decoder with grouped KV heads, where its config names them)."""
    model_type = getattr(config, "model_type", "")
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None:
        return grouped_kv_width(config)
    return None if family.kv_width is None else family.kv_width(config)


def up_projections() -> dict[type[nn.Module], str]:
    """MLP block class -> the attribute of its up-projection, over every family (CLOVER-FT's ``mlp=True``)."""
    return {cls: attr for f in FAMILIES for cls, attr in f.up_projections.items()}


def export_code(model: nn.Module, folder: Path) -> dict[str, str]:
    """Copy the modeling code ``model`` needs into ``folder``.

    Args:
        model: a pruned model.
        folder: the checkpoint folder being written.

    Returns:
        The ``auto_map`` entry for ``config.json`` (auto class -> ``"file.Class"``); empty when the
        model's class has no self-contained code (the folder then loads with ``clover_core.load_pruned``).
    """
    family = next((f for f in FAMILIES if f.remote is not None and type(model) is f.model_class), None)
    if family is None:
        supported = ", ".join(f.model_class.__name__ for f in FAMILIES if f.remote is not None)
        log.warning(
            "%s has no self-contained modeling code (supported: %s); the checkpoint will load with "
            "clover_core.load_pruned only, not with trust_remote_code",
            type(model).__name__,
            supported,
        )
        return {}
    code = family.remote
    for name in (f"{code.module}.py", *code.extra):
        shutil.copyfile(REMOTE_DIR / name, folder / name)
    return {auto: f"{code.module}.{code.cls}" for auto in code.autos}


def base_class(name: str) -> type[nn.Module] | None:
    """The library class a shipped modeling class extends (``"CloverGPT2LMHeadModel"`` -> GPT2LMHeadModel):
    a folder re-saved from a model loaded with ``trust_remote_code`` names the shipped class."""
    return next((f.model_class for f in FAMILIES if f.remote is not None and f.remote.cls == name), None)


__all__ = [
    "FAMILIES",
    "PIPELINE_PART",
    "Adapter",
    "Factors",
    "Family",
    "Kind",
    "RemoteCode",
    "adapter_for",
    "attention_modules",
    "auto_class",
    "base_class",
    "export_code",
    "family_of",
    "is_rank_major",
    "kind_of",
    "padded_width",
    "register",
    "unpruned_kv_width",
    "unregister",
    "up_projections",
]
