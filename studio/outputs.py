"""Side-by-side outputs of the original and pruned models: text continuations, transcripts and
images, with the caps a public server needs on what users send (no UI code here)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 128
MAX_AUDIO_SECONDS = 30.0  # one Whisper window
MAX_AUDIO_BYTES = 10 * 2**20
MAX_TRANSCRIPT_TOKENS = 128  # a heavily pruned model may babble; this bounds the time it takes
IMAGE_PROMPT = "a photograph of an astronaut riding a horse"
MAX_IMAGE_STEPS = 50


@torch.no_grad()
def complete_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (the new text only).

    Raises:
        ValueError: an empty prompt, one over ``MAX_PROMPT_TOKENS`` tokens, or ``max_new_tokens``
            outside ``1..MAX_NEW_TOKENS``.
    """
    if not prompt or not prompt.strip():
        raise ValueError("prompt is empty; type a few words to continue")
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be between 1 and {MAX_NEW_TOKENS}")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] > MAX_PROMPT_TOKENS:
        raise ValueError(f"the prompt has {ids.shape[1]} tokens, over the cap of {MAX_PROMPT_TOKENS}; shorten it")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        do_sample=False,
        num_beams=1,
        max_new_tokens=int(max_new_tokens),
        pad_token_id=pad,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def read_audio(path: str | os.PathLike) -> np.ndarray:
    """An uploaded or recorded clip as 16 kHz mono, within the caps (size, then duration); messages name
    the file, not the server folder it was uploaded to.

    Raises:
        ValueError: over ``MAX_AUDIO_BYTES`` or ``MAX_AUDIO_SECONDS``, not audio, or silent.
        FileNotFoundError: the file does not exist.
    """
    from clover_core.audio import is_silent, load_audio

    path = Path(path)
    size = path.stat().st_size
    if size > MAX_AUDIO_BYTES:
        raise ValueError(
            f"{path.name} is {size / 2**20:.1f} MB, over the cap of {MAX_AUDIO_BYTES / 2**20:g} MB; "
            "trim it or compress it (FLAC, OGG, MP3)"
        )
    try:
        samples = load_audio(str(path), max_seconds=MAX_AUDIO_SECONDS)
    except ValueError as e:
        raise ValueError(str(e).replace(str(path), path.name)) from None
    if is_silent(samples):
        raise ValueError(
            f"{path.name} is silent (no sample above -80 dBFS); record again, or upload a clip with speech"
        )
    return samples


def transcribe_clip(model: nn.Module, processor, audio, language: str | None = None) -> str:
    """Greedy transcript; ``language`` is passed only to multilingual models (English-only ones refuse it)."""
    from clover_core.audio import transcribe

    multilingual = getattr(model.generation_config, "is_multilingual", False)
    return transcribe(
        model, processor, audio, language=language if multilingual else None, max_new_tokens=MAX_TRANSCRIPT_TOKENS
    )


@torch.no_grad()
def make_image(pipe, unet: nn.Module, prompt: str, seed: int, steps: int) -> torch.Tensor:
    """One image of ``pipe`` run with ``unet`` (same components, scheduler and seed), ``(3, H, W)`` in [0, 1].

    Raises:
        ValueError: an empty prompt or ``steps`` outside ``1..MAX_IMAGE_STEPS``.
    """
    from clover_core.zoo.random_models import generate_image, with_unet

    if not prompt or not prompt.strip():
        raise ValueError("prompt is empty; describe the image to generate")
    if not 1 <= int(steps) <= MAX_IMAGE_STEPS:
        raise ValueError(f"steps={steps} must be between 1 and {MAX_IMAGE_STEPS}")
    runner = pipe if unet is pipe.unet else with_unet(pipe, unet)
    return generate_image(runner, prompt, seed=int(seed), steps=int(steps))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A ``(3, H, W)`` image in [0, 1] as an ``(H, W, 3)`` uint8 array for display."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
