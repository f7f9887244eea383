"""Name, folder or hub id -> (model, processor): dispatch only.

An offline name goes to its loader in :mod:`.zoo`; a folder is read as a CLOVER checkpoint, a
diffusers pipeline or model, or a transformers model; anything else is a Hugging Face hub id, loaded
from the local cache when the hub is unreachable. Safetensors only: never a pickle, never remote code.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .architectures import auto_class
from .io.checkpoint import cast_model, load_processor, load_pruned
from .io.weights import diffusers_class, is_checkpoint, is_diffusers_config, read_config, weights_variant
from .zoo import EMBEDDED

log = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    """A loaded model with what turns inputs into its tensors.

    ``processor`` is the tokenizer (language models), the ``WhisperProcessor`` (speech), or, for a
    diffusion pipeline, the pipeline itself: ``model`` is then its UNet, the part CLOVER prunes.
    """

    model: nn.Module
    processor: object | None
    name: str


def load_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> ModelBundle:
    """Load a model by embedded name, local folder, or Hugging Face hub id.

    Args:
        name_or_path: an embedded offline name (see ``EMBEDDED``), a folder in the standard layout
            (a CLOVER checkpoint, a diffusers pipeline, or one diffusers model such as a pipeline's
            ``unet/``), or a hub id such as ``openai-community/gpt2-xl``.
        dtype: cast the model; default: the checkpoint's own dtype (float32 for embedded models).

    Returns:
        A :class:`ModelBundle` with the model in eval mode on the CPU.

    Raises:
        ValueError: an unknown name, or a hub id that is neither cached nor reachable.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(
            f"model={name_or_path!r} is not a model name; use one of {', '.join(EMBEDDED)}, a local folder or a hub id"
        )
    name = str(name_or_path)
    if name in EMBEDDED:
        model, processor = EMBEDDED[name][1]()
    elif Path(name).is_dir():
        model, processor = _from_folder(Path(name))
    elif Path(name).exists():
        raise ValueError(f"model={name!r} is a file; pass the folder that holds config.json")
    else:
        model, processor = _from_hub(name)
    if dtype is not None:
        model = cast_model(model, dtype)
    return ModelBundle(model.eval(), processor, name)


def _from_folder(folder: Path) -> tuple[nn.Module, object]:
    if (folder / "model_index.json").is_file():  # the UNet's weights tell the variant (SDXL: often fp16 only)
        return _diffusion(str(folder), local_only=True, variant=weights_variant(folder / "unet"))
    config = read_config(folder)  # a clear error if config.json is missing or broken
    if is_checkpoint(folder):
        return load_pruned(folder), load_processor(str(folder), local_only=True)
    if is_diffusers_config(config):  # one model of a pipeline, e.g. its unet/
        return _diffusers_model(folder, config["_class_name"]), None
    return _auto_model(str(folder), local_only=True, variant=weights_variant(folder)), load_processor(
        str(folder), local_only=True
    )


def _diffusers_model(folder: Path, class_name: object) -> nn.Module:
    """A diffusers model saved on its own (``config.json`` naming its class, as a pipeline's ``unet/``),
    with plain or variant weights (``diffusion_pytorch_model.fp16.safetensors``)."""
    return diffusers_class(folder, class_name).from_pretrained(
        str(folder),
        use_safetensors=True,  # never a pickle
        variant=weights_variant(folder),
    )


def _from_hub(name: str) -> tuple[nn.Module, object]:
    local_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not hub_reachable()
    try:
        if _is_diffusion_repo(name, local_only):
            return _diffusion(name, local_only)
        return _auto_model(name, local_only), load_processor(name, local_only)
    except OSError as e:
        where = "is not in the local Hugging Face cache and the hub is unreachable" if local_only else f"failed: {e}"
        raise ValueError(f"model={name!r} {where}. Offline models: {', '.join(EMBEDDED)}") from None


def _auto_model(name: str, local_only: bool, variant: str | None = None) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(name, local_files_only=local_only)
    auto = getattr(transformers, auto_class(config.model_type))
    try:  # safetensors only: never a pickle. The PEFT adapter probe ignores local_files_only unless told
        return auto.from_pretrained(
            name,
            local_files_only=local_only,
            use_safetensors=True,
            variant=variant,
            adapter_kwargs={"local_files_only": local_only},
        )
    except ValueError as e:
        raise ValueError(
            f"model={name!r} ({config.model_type}) is not a language or speech model CLOVER Studio can load: {e}"
        ) from None


def _is_diffusion_repo(name: str, local_only: bool) -> bool:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        hf_hub_download(name, "model_index.json", local_files_only=local_only)
        return True
    except (EntryNotFoundError, HFValidationError, OSError) as e:  # not cached, not on the hub, or no such repo
        log.debug("%s is not a diffusers pipeline repository (%s)", name, e)
        return False


def _diffusion(name: str, local_only: bool, variant: str | None = None) -> tuple[nn.Module, object]:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(name, local_files_only=local_only, use_safetensors=True, variant=variant)
    if getattr(pipe, "unet", None) is None:
        raise ValueError(
            f"model={name!r} is a {type(pipe).__name__} without a UNet; CLOVER Studio prunes the "
            "attention of UNet pipelines such as stabilityai/stable-diffusion-xl-base-1.0"
        )
    if not Path(name).is_dir():  # a hub id: the UNet's config names its snapshot folder, the record the id
        pipe.unet.register_to_config(_name_or_path=name)
    return pipe.unet, pipe


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
