"""Attention for pruned heads: query/key width != value width, and the ORIGINAL softmax scale.

The pruned modules themselves live next to their architecture in ``adapters/``; they all call
:func:`attend`, which dispatches to the model's configured attention implementation (SDPA by default,
which accepts a value width different from the key width) and never infers the scale from the
pruned key width (the public reference code does, and so changes the model).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def eager_attention(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. q: ``(B, nh, T, qk)``, k: ``(B, nkv, S, qk)``, v: ``(B, nkv, S, v)``
    -> ``(B, T, nh, v)``; each KV head serves ``nh / nkv`` consecutive query heads."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, S, *)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, nh, T, S)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., : k.shape[-2]], torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask[..., : k.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, v).transpose(1, 2), weights  # (B, T, nh, v)


def attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scaling: float, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the model's configured attention with an explicit softmax ``scaling``.

    Args:
        module: the calling attention module (carries ``config`` and ``training``).
        q, k: ``(B, nh, T, qk_dim)`` and ``(B, nkv, S, qk_dim)``; v: ``(B, nkv, S, v_dim)``.
        mask: the additive or boolean mask the model prepared, or None.
        scaling: the original ``1/sqrt(head_dim)`` (times any model-specific factor), or 1.0 when
            the caller already scaled ``q`` (Whisper does, to match the original rounding).
        dropout: attention dropout probability (used only in training mode).

    Returns:
        ``(out, weights)`` with ``out`` shaped ``(B, T, nh, v_dim)``.
    """
    impl = getattr(module.config, "_attn_implementation", "eager") or "eager"
    dropout = dropout if module.training else 0.0
    if impl == "eager":
        return eager_attention(module, q, k, v, mask, scaling, dropout=dropout)
    fn = ALL_ATTENTION_FUNCTIONS[impl]
    kwargs.pop("output_attentions", None)
    return fn(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)


def padded_width(ranks: list[int]) -> int:
    """The width a layer stores for ragged per-head ranks: the largest rank, at least 1.

    Heads with fewer directions are zero-padded (exact: a zero column changes neither scores nor
    outputs); a width of at least 1 keeps every attention kernel happy when a whole layer is pruned.
    """
    return max(1, max(ranks, default=0))
