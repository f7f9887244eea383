"""GPT-2 with CLOVER-pruned attention, loadable with ``trust_remote_code=True`` (no clover_core needed).

``config.clover["ranks"]`` holds every head's kept Q-K and V-O rank; each attention layer stores the
largest rank of its heads (shorter heads are zero-padded) and keeps the original softmax scale. The
fused ``c_attn`` is split into ``q_proj``, ``k_proj`` and ``v_proj`` (``Conv1D``, rank-major features).
"""

from __future__ import annotations

from transformers import GPT2LMHeadModel
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D

from .clover_attention import attend, merge_ranks, shrink_attention, split_ranks


class CloverGPT2Attention(GPT2Attention):
    """GPT-2 self-attention with ``qk_dim`` query/key and ``v_dim`` value features per head; the scale
    stays the original ``1/sqrt(n_embd / n_head)`` (computed by the parent from the config)."""

    def __init__(self, config, layer_idx: int | None, qk_dim: int, v_dim: int):
        super().__init__(config, is_cross_attention=False, layer_idx=layer_idx)
        del self.c_attn  # one projection per role: each is a slice of its own cached weight when re-pruned
        self.qk_dim, self.v_dim = qk_dim, v_dim
        d, h = self.embed_dim, self.num_heads
        self.q_proj, self.k_proj, self.v_proj = Conv1D(h * qk_dim, d), Conv1D(h * qk_dim, d), Conv1D(h * v_dim, d)
        self.c_proj = Conv1D(d, h * v_dim)

    def forward(self, hidden_states, past_key_values=None, attention_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, output_attentions=False, **kwargs):
        if encoder_hidden_states is not None:
            raise NotImplementedError("pruned GPT-2 cross-attention is not supported")
        h = self.num_heads
        q = split_ranks(self.q_proj(hidden_states), h, self.qk_dim)  # (B, nh, T, qk)
        k = split_ranks(self.k_proj(hidden_states), h, self.qk_dim)  # (B, nh, T, qk)
        v = split_ranks(self.v_proj(hidden_states), h, self.v_dim)  # (B, nh, T, v)
        if past_key_values is not None:
            cache = past_key_values
            if isinstance(cache, EncoderDecoderCache):
                cache = cache.self_attention_cache
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.attn_dropout.p
        out, weights = attend(self, q, k, v, attention_mask, self.scaling, dropout, **kwargs)  # (B, T, nh, v)
        return self.resid_dropout(self.c_proj(merge_ranks(out))), weights


def _pruned(original: GPT2Attention, widths: dict[str, int]) -> CloverGPT2Attention:
    full = original.head_dim
    return CloverGPT2Attention(original.config, original.layer_idx, widths.get("qk", full), widths.get("vo", full))


class CloverGPT2LMHeadModel(GPT2LMHeadModel):
    """:class:`GPT2LMHeadModel` whose attention layers have the shapes recorded in ``config.clover``."""

    def __init__(self, config):
        super().__init__(config)
        shrink_attention(self, _pruned)
