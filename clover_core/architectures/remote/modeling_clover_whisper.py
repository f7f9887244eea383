"""Whisper with CLOVER-pruned attention, loadable with ``trust_remote_code=True`` (no clover_core needed).

Encoder self-attention, decoder self-attention and decoder cross-attention (``encoder_attn``) may all be
pruned; ``k_proj`` has no bias; ``q`` is multiplied by the ORIGINAL ``1/sqrt(head_dim)`` before the
attention, exactly as the original module does. Each layer stores the largest rank of its heads.
"""

from __future__ import annotations

from torch import nn
from transformers import WhisperForConditionalGeneration
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.whisper.modeling_whisper import WhisperAttention

from .clover_attention import attend, from_heads, shrink_attention, to_heads


class CloverWhisperAttention(WhisperAttention):
    """Whisper attention with ``qk_dim`` query/key and ``v_dim`` value features per head (rank-major
    projections with ``rank_major=True``: a model re-pruned in place)."""

    def __init__(self, original: WhisperAttention, qk_dim: int, v_dim: int, rank_major: bool = False):
        super().__init__(
            original.embed_dim,
            original.num_heads,
            original.dropout,
            original.is_decoder,
            True,
            original.is_causal,
            original.layer_idx,
            original.config,
        )
        self.qk_dim, self.v_dim, self.rank_major = qk_dim, v_dim, rank_major
        d, h = self.embed_dim, self.num_heads
        self.q_proj = nn.Linear(d, h * qk_dim, bias=True)
        self.k_proj = nn.Linear(d, h * qk_dim, bias=False)
        self.v_proj = nn.Linear(d, h * v_dim, bias=True)
        self.out_proj = nn.Linear(h * v_dim, d, bias=True)

    def forward(
        self,
        hidden_states,
        key_value_states=None,
        past_key_values=None,
        attention_mask=None,
        output_attentions=False,
        cache=None,
        **kwargs,
    ):
        h, rm, cross = self.num_heads, self.rank_major, key_value_states is not None
        q = to_heads(self.q_proj(hidden_states) * self.scaling, h, self.qk_dim, rm)  # (B, nh, T, qk)
        cache, reuse = past_key_values if cache is None else cache, False  # transformers >= 5.24: cache
        if isinstance(cache, EncoderDecoderCache):
            reuse = cross and bool(cache.is_updated.get(self.layer_idx))
            if cross:
                cache.is_updated[self.layer_idx] = True
            cache = cache.cross_attention_cache if cross else cache.self_attention_cache
        if reuse:  # cross-attention keys/values are computed once per generation
            k, v = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            source = key_value_states if cross else hidden_states
            k = to_heads(self.k_proj(source), h, self.qk_dim, rm)  # (B, nh, S, qk)
            v = to_heads(self.v_proj(source), h, self.v_dim, rm)  # (B, nh, S, v)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
        out, weights = attend(self, q, k, v, attention_mask, 1.0, self.dropout, **kwargs)  # (B, T, nh, v)
        return self.out_proj(from_heads(out, rm)), weights


def _pruned(original: WhisperAttention, widths: dict[str, int]) -> CloverWhisperAttention:
    full = original.head_dim
    return CloverWhisperAttention(original, widths.get("qk", full), widths.get("vo", full))


class CloverWhisperForConditionalGeneration(WhisperForConditionalGeneration):
    """:class:`WhisperForConditionalGeneration` with the attention shapes recorded in ``config.clover``."""

    def __init__(self, config):
        super().__init__(config)
        shrink_attention(self, _pruned)
