"""GPT-2 with CLOVER-pruned attention, loadable with ``trust_remote_code=True`` (no clover_core needed).

``config.clover["ranks"]`` holds every head's kept Q-K and V-O rank; each attention layer stores the
largest rank of its heads (shorter heads are zero-padded) and keeps the original softmax scale.
"""

from __future__ import annotations

from transformers import GPT2LMHeadModel
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D

from .clover_attention import attend, from_heads, shrink_attention, to_heads


class CloverGPT2Attention(GPT2Attention):
    """GPT-2 self-attention with ``qk_dim`` query/key and ``v_dim`` value features per head; the scale
    stays the original ``1/sqrt(n_embd / n_head)`` (computed by the parent from the config).

    ``rank_major=True`` (a model re-pruned in place) replaces the fused ``c_attn`` by ``q_proj``,
    ``k_proj`` and ``v_proj`` with rank-major features, so each can be a slice of its own cached weight.
    """

    def __init__(self, config, layer_idx: int | None, qk_dim: int, v_dim: int, rank_major: bool = False):
        super().__init__(config, is_cross_attention=False, layer_idx=layer_idx)
        self.qk_dim, self.v_dim, self.rank_major = qk_dim, v_dim, rank_major
        d, h = self.embed_dim, self.num_heads
        if rank_major:
            del self.c_attn
            self.q_proj, self.k_proj, self.v_proj = Conv1D(h * qk_dim, d), Conv1D(h * qk_dim, d), Conv1D(h * v_dim, d)
        else:
            self.c_attn = Conv1D(h * (2 * qk_dim + v_dim), d)
        self.c_proj = Conv1D(d, h * v_dim)

    def forward(
        self,
        hidden_states,
        past_key_values=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        output_attentions=False,
        cache=None,
        **kwargs,
    ):
        cache = past_key_values if cache is None else cache  # transformers >= 5.24 passes it as cache
        if encoder_hidden_states is not None:
            raise NotImplementedError("pruned GPT-2 cross-attention is not supported")
        h, rm = self.num_heads, self.rank_major
        if rm:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        else:
            q, k, v = self.c_attn(hidden_states).split([h * self.qk_dim, h * self.qk_dim, h * self.v_dim], dim=2)
        q, k, v = to_heads(q, h, self.qk_dim, rm), to_heads(k, h, self.qk_dim, rm), to_heads(v, h, self.v_dim, rm)
        if cache is not None:  # q, k: (B, nh, T, qk); v: (B, nh, T, v)
            if isinstance(cache, EncoderDecoderCache):
                cache = cache.self_attention_cache
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.attn_dropout.p
        out, weights = attend(self, q, k, v, attention_mask, self.scaling, dropout, **kwargs)  # (B, T, nh, v)
        return self.resid_dropout(self.c_proj(from_heads(out, rm))), weights


def _pruned(original: GPT2Attention, widths: dict[str, int]) -> CloverGPT2Attention:
    full = original.head_dim
    return CloverGPT2Attention(original.config, original.layer_idx, widths.get("qk", full), widths.get("vo", full))


class CloverGPT2LMHeadModel(GPT2LMHeadModel):
    """:class:`GPT2LMHeadModel` whose attention layers have the shapes recorded in ``config.clover``."""

    def __init__(self, config):
        super().__init__(config)
        shrink_attention(self, _pruned)
