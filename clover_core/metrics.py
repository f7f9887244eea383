"""Quality and size metrics: perplexity, word error rate, teacher-forced loss, image similarity,
parameter counts and KV-cache bytes per token.

Every metric here is model-agnostic and deterministic; long evaluations show a progress bar and can
be limited (``max_tokens``, ``max_clips``).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .architectures import unpruned_kv_width

# --------------------------------------------------------------------------- language models


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    window: int = 1024,
    stride: int = 512,
    max_tokens: int | None = None,
    progress: bool = True,
) -> float:
    """Sliding-window perplexity of a causal LM (the protocol of the transformers guide and the paper).

    Each window of ``window`` tokens starts ``stride`` after the previous one; only tokens not scored
    by an earlier window count, each conditioned on up to ``window - 1`` preceding tokens. The loss is
    computed from the logits in float32, whatever the model's dtype.

    Args:
        model: a causal LM returning ``.logits`` of shape ``(1, T, vocab)``.
        input_ids: 1-D (or ``(1, T)``) token ids.
        window: context length, at most the model's position limit.
        stride: step between windows, ``1 <= stride <= window``.
        max_tokens: evaluate only the first ``max_tokens`` tokens.
        progress: show a progress bar.

    Raises:
        ValueError: bad window / stride, or fewer than 2 tokens.
    """
    ids = _as_ids(input_ids)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens={max_tokens} is too small; perplexity needs at least 2 tokens")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    if not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    limit = position_limit(model)
    if limit is not None and window > limit:
        raise ValueError(f"window={window} exceeds this model's {limit} positions; pass window<={limit}")
    device = _device(model)
    n = ids.numel()
    total, counted, prev_end = 0.0, 0, 0
    starts = list(range(0, n, stride))
    for begin in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        end = min(begin + window, n)
        new = end - prev_end  # tokens not scored before
        chunk = ids[begin:end][None].to(device)
        logits = model(input_ids=chunk).logits[0].float()  # (T, V)
        targets = chunk[0, 1:]
        nll = F.cross_entropy(logits[:-1], targets, reduction="none")  # (T - 1,)
        score = nll[-new:] if new < nll.numel() else nll  # the first token has no prediction
        total += score.double().sum().item()
        counted += score.numel()
        prev_end = end
        if end == n:
            break
    return math.exp(total / counted)


def text_perplexity(model: nn.Module, tokenizer, text: str, **kwargs) -> float:
    """:func:`perplexity` of ``text`` (tokenized without special tokens)."""
    if not text or not text.strip():
        raise ValueError("text is empty; perplexity needs at least 2 tokens")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return perplexity(model, ids, **kwargs)


def _as_ids(input_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
    return ids.long()


def position_limit(model: nn.Module) -> int | None:
    """The longest window :func:`perplexity` accepts for ``model`` (its learned positions), or None
    where there is no hard limit (rotary models)."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "max_target_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and key != "max_position_embeddings":
            return value
    return None  # rotary models extrapolate; their limit is advisory


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- speech

_PUNCT = re.compile(r"[^\w\s']")
_SPACES = re.compile(r"\s+")


def normalize_transcript(text: str) -> str:
    """Lower-case, strip accents' compatibility forms, drop punctuation (apostrophes kept inside words),
    collapse whitespace: "Hello, World!" -> "hello world"."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"(^|\s)'|'(\s|$)", " ", text)
    return _SPACES.sub(" ", text).strip()


def word_error_rate(
    references: Sequence[str] | str, hypotheses: Sequence[str] | str, *, normalize: bool = True
) -> float:
    """Corpus word error rate (jiwer): total edits over total reference words.

    Raises:
        ValueError: lengths differ, or the references hold no words.
    """
    import jiwer

    refs = [references] if isinstance(references, str) else list(references)
    hyps = [hypotheses] if isinstance(hypotheses, str) else list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if normalize:
        refs, hyps = [normalize_transcript(r) for r in refs], [normalize_transcript(h) for h in hyps]
    if not any(r.split() for r in refs):
        raise ValueError("the references contain no words; word error rate is undefined")
    pairs = [(r, h) for r, h in zip(refs, hyps) if r.split()]
    edits = words = 0
    for r, h in pairs:
        out = jiwer.process_words(r, h if h else "")
        edits += out.substitutions + out.deletions + out.insertions
        words += len(r.split())
    return edits / words


@torch.no_grad()
def teacher_forced_loss(
    model: nn.Module, input_features: torch.Tensor, labels: torch.Tensor, decoder_input_ids: torch.Tensor | None = None
) -> float:
    """Mean token cross-entropy (nats) of a reference transcript under a seq2seq model, teacher-forced.

    Args:
        model: e.g. ``WhisperForConditionalGeneration``.
        input_features: ``(B, n_mels, frames)`` log-mel features.
        labels: ``(B, T)`` reference token ids, ``-100`` where not scored (e.g. the prompt tokens).
        decoder_input_ids: ``(B, T)`` decoder inputs aligned with ``labels`` (position t predicts
            ``labels[:, t]``); default: the model shifts ``labels`` right itself.

    Raises:
        ValueError: no token is scored, or the shapes do not align.
    """
    if not (labels != -100).any():
        raise ValueError("labels hold no scored token (all -100)")
    if decoder_input_ids is not None and decoder_input_ids.shape != labels.shape:
        raise ValueError(
            f"decoder_input_ids {tuple(decoder_input_ids.shape)} and labels {tuple(labels.shape)} "
            "must have the same shape"
        )
    device = _device(model)
    dtype = next(model.parameters()).dtype
    kwargs = (
        {"labels": labels.to(device)}
        if decoder_input_ids is None
        else {"decoder_input_ids": decoder_input_ids.to(device)}
    )
    logits = model(input_features=input_features.to(device, dtype), **kwargs).logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.to(device).reshape(-1), ignore_index=-100
    ).item()


# --------------------------------------------------------------------------- images


def _as_images(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"images must be (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    return x.double()


def psnr(reference: torch.Tensor, image: torch.Tensor, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images).

    Raises:
        ValueError: shapes differ.
    """
    ref, img = _as_images(reference), _as_images(image)
    if ref.shape != img.shape:
        raise ValueError(f"image shapes differ: {tuple(ref.shape)} vs {tuple(img.shape)}")
    mse = (ref - img).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    reference: torch.Tensor, image: torch.Tensor, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> float:
    """Structural similarity (Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03),
    averaged over channels and the valid region; 1.0 for identical images.

    Raises:
        ValueError: shapes differ, or images smaller than the window.
    """
    ref, img = _as_images(reference), _as_images(image)
    if ref.shape != img.shape:
        raise ValueError(f"image shapes differ: {tuple(ref.shape)} vs {tuple(img.shape)}")
    if min(ref.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(ref.shape[-2:])} pixels are smaller than the {window}x{window} window")
    c = ref.shape[1]
    g = _gaussian_window(window, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(ref), blur(img)
    var_x = blur(ref * ref) - mu_x**2
    var_y = blur(img * img) - mu_y**2
    cov = blur(ref * img) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).mean().item()


# --------------------------------------------------------------------------- sizes


def parameter_count(model: nn.Module) -> int:
    """True parameter count: every parameter, minus the zero padding of ragged pruned heads."""
    total = sum(p.numel() for p in model.parameters())
    return total - sum(getattr(m, "clover_padding", 0) for m in model.modules())


def output_cache(out) -> object:
    """The KV cache a forward pass returned (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def kv_cache_bytes_per_token(model: nn.Module) -> int:
    """Bytes one generated token adds to the KV cache (true ranks, not padding), in the model's dtype.

    Pruned models sum the K + V widths their attention modules record; unpruned ones use the
    width their family declares from the config (:func:`~clover_core.architectures.unpruned_kv_width`:
    GPT-2 ``2 * n_layer * n_embd``, Llama ``2 * layers * kv_heads * head_dim``, Whisper's decoder
    self-attention ``2 * decoder_layers * d_model``). Models that cache nothing (a UNet) give 0.
    """
    element = next(model.parameters()).element_size()
    widths = [m.kv_width for m in model.modules() if hasattr(m, "kv_width")]
    if widths:
        return int(sum(widths)) * element
    config = getattr(model, "config", None)
    if config is None or isinstance(config, dict):
        return 0
    return (unpruned_kv_width(config) or 0) * element
