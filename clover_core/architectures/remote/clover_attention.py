"""Attention for CLOVER-pruned heads, shared by the modeling files of a pruned checkpoint.

This file is copied into every pruned folder by ``clover_core.save_pruned`` and runs with
transformers and torch alone (``trust_remote_code=True``): it must never import ``clover_core``.
Pruned heads keep fewer query/key and value features than ``head_dim``, so the softmax scale is
passed explicitly (the ORIGINAL ``1/sqrt(head_dim)``); it is never inferred from the pruned width.
Each layer stores the largest per-head rank; shorter heads are zero-padded, which changes nothing.

Projections are head-major, like the original models (feature ``h * width + j`` is direction ``j``
of head ``h``). A model that ``clover_core.Slider`` re-prunes in place uses the rank-major layout
instead (``j * heads + h``, ``rank_major = True``): keeping every head's best ``r`` directions is then
a prefix of one cached weight, a slice rather than a copy. Checkpoints are always saved head-major.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def padded_width(ranks: list[int]) -> int:
    """The width a layer stores for ragged per-head ranks: the largest rank, at least 1."""
    return max(1, max(ranks, default=0))


# Decoding with unequal widths on the CPU: padding the narrower cache side for the fused kernel beats
# eager attention's fixed per-op cost below about 200 KiB of that side (measured on a 2-core EPYC; CUDA
# follows the same rule, not measured there).
PAD_CACHE_BYTES = 192 * 1024

# torch's fused CUDA attention (the memory-efficient kernel, the one that takes a value width unlike the
# query/key width) needs both widths divisible by 8 in half precision (4 in float32) on sm80 and newer;
# other widths fall back to the unfused math path (torch's ``check_head_dim_size_mem_efficient``).
CUDA_WIDTH_MULTIPLE = 8


def fused_widths(qk: int, v: int, device_type: str) -> tuple[int, int]:
    """The query/key and value widths torch's fused SDPA kernels take on ``device_type``: equal widths
    on the CPU; multiples of :data:`CUDA_WIDTH_MULTIPLE` on CUDA. Pruned widths are zero-padded up to
    them (exact), or kept where they already fit."""
    if device_type == "cpu":
        return (max(qk, v),) * 2
    if device_type == "cuda":
        return tuple(-(-w // CUDA_WIDTH_MULTIPLE) * CUDA_WIDTH_MULTIPLE for w in (qk, v))
    return qk, v


def to_heads(x: torch.Tensor, heads: int, width: int, rank_major: bool = False) -> torch.Tensor:
    """Projected features ``(B, T, heads * width)`` -> per-head ``(B, heads, T, width)``."""
    if rank_major:
        return x.unflatten(-1, (width, heads)).permute(0, 3, 1, 2).contiguous()
    return x.unflatten(-1, (heads, width)).transpose(1, 2)


def from_heads(out: torch.Tensor, rank_major: bool = False) -> torch.Tensor:
    """Per-head attention output ``(B, T, heads, width)`` -> ``(B, T, heads * width)``, in the layout
    the output projection expects."""
    return (out.transpose(-1, -2) if rank_major else out).flatten(-2)


def eager_attention(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. q: ``(B, nh, T, qk)``, k: ``(B, nkv, S, qk)``, v: ``(B, nkv, S, v)``
    -> ``(B, T, nh, v)``; each KV head serves ``nh / nkv`` consecutive query heads, whose queries are
    stacked against it (the cache is never repeated)."""
    b, nh, t, _ = q.shape
    nkv, s = k.shape[1], k.shape[-2]
    groups = nh // nkv
    if groups > 1:
        q = q.reshape(b, nkv, groups * t, -1)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scaling)  # (B, nkv, g*T, S); fresh, so in place
    if mask is not None:
        mask = mask[..., :s] if mask.shape[-1] != s else mask  # (B or 1, 1 or nh, T, S)
        if groups > 1:
            if mask.shape[1] == 1:
                mask = mask.expand(mask.shape[0], groups, *mask.shape[-2:])
            mask = mask.reshape(mask.shape[0], -1, groups * mask.shape[-2], s)
        if mask.dtype == torch.bool:
            scores.masked_fill_(mask.logical_not(), torch.finfo(scores.dtype).min)
        else:
            scores.add_(mask)
    if scores.dtype == torch.float32:
        weights = torch.softmax(scores, dim=-1)
    else:
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout and module.training:
        weights = nn.functional.dropout(weights, p=dropout, training=True)
    out = torch.matmul(weights, v)
    if groups > 1:
        out, weights = out.reshape(b, nh, t, -1), weights.reshape(b, nh, t, s)
    return out.transpose(1, 2), weights  # (B, T, nh, v)


def attend(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's configured attention implementation (SDPA by default) with an explicit ``scaling``;
    returns ``(out, weights)`` with ``out`` shaped ``(B, T, nh, v_dim)``.

    torch's fused SDPA kernels take only some widths (:func:`fused_widths`): on the CPU the value width
    must equal the query/key width, on CUDA both must be multiples of 8. Pruned heads often miss, and
    SDPA's fallback (its math path, which also repeats the KV cache for every query group) is 3-10x
    slower on the CPU. So the widths are zero-padded up to ones the kernels take (exact: a zero feature
    adds nothing), except when one new token (decoding) meets a cache too large to copy cheaply: that
    step takes :func:`eager_attention`, which reads the cache once.
    """
    impl = getattr(module.config, "_attn_implementation", "eager") or "eager"
    dropout = dropout if module.training else 0.0
    if impl == "eager":
        return eager_attention(module, q, k, v, mask, scaling, dropout=dropout)
    kwargs.pop("output_attentions", None)
    width, qk = v.shape[-1], q.shape[-1]
    qk_to, v_to = fused_widths(qk, width, q.device.type) if impl == "sdpa" else (qk, width)
    if (qk_to, v_to) != (qk, width):
        copied = [t for t, short in ((k, qk_to != qk), (v, v_to != width)) if short]  # cache sides to pad
        if q.shape[-2] == 1 and sum(t.numel() * t.element_size() for t in copied) > PAD_CACHE_BYTES:
            return eager_attention(module, q, k, v, mask, scaling, dropout=dropout)
        if qk_to != qk:
            q, k = nn.functional.pad(q, (0, qk_to - qk)), nn.functional.pad(k, (0, qk_to - qk))
        if v_to != width:
            v = nn.functional.pad(v, (0, v_to - width))
        out, weights = ALL_ATTENTION_FUNCTIONS[impl](module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)
        return out[..., :width], weights
    return ALL_ATTENTION_FUNCTIONS[impl](module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)


def shrink_attention(model: nn.Module, build) -> None:
    """Replace every attention module listed in ``model.config.clover["ranks"]`` by its pruned form.

    Args:
        model: a freshly constructed model of the original architecture.
        build: ``build(original_module, widths) -> new module``, ``widths = {"qk": w, "vo": w}`` for
            the pairs that were pruned (the padded per-layer widths).

    Raises:
        ValueError: the config has no CLOVER record, or names a module the model does not have.
    """
    record = getattr(model.config, "clover", None)
    if not isinstance(record, dict) or not isinstance(record.get("ranks"), dict):
        raise ValueError("config.json has no 'clover' entry with per-head ranks; this is not a CLOVER checkpoint")
    for name, ranks in record["ranks"].items():
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"config.json lists ranks for {name!r}, which the model does not have") from None
        parent, _, child = name.rpartition(".")
        new = build(original, {pair: padded_width(r) for pair, r in ranks.items()})
        setattr(model.get_submodule(parent) if parent else model, child, new)
