"""Llama (SmolLM2 included) with CLOVER-pruned V-O pairs, loadable with ``trust_remote_code=True``
(no clover_core needed).

Only values and outputs are pruned: the rotary embedding sits between ``W_q`` and ``W_k``, so queries
and keys keep ``head_dim``. With grouped-query attention, ``config.clover["ranks"]`` holds one V-O rank
per KV head; each layer stores the largest of them (shorter heads are zero-padded).
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from .clover_attention import attend, from_heads, shrink_attention, to_heads


class CloverLlamaAttention(LlamaAttention):
    """Llama attention whose value heads keep ``v_dim`` features (queries and keys unchanged); rank-major
    ``v_proj`` / ``o_proj`` with ``rank_major=True`` (a model re-pruned in place)."""

    def __init__(self, config, layer_idx: int, v_dim: int, rank_major: bool = False):
        super().__init__(config, layer_idx)
        self.v_dim, self.rank_major = v_dim, rank_major
        bias = config.attention_bias
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * v_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * v_dim, config.hidden_size, bias=bias)

    def forward(
        self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None, **kwargs
    ):
        cache = past_key_values if cache is None else cache  # transformers >= 5.24 passes it as cache
        bsz, seq = hidden_states.shape[:2]
        q = self.q_proj(hidden_states).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(hidden_states).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = to_heads(self.v_proj(hidden_states), self.config.num_key_value_heads, self.v_dim, self.rank_major)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, weights = attend(self, q, k, v, attention_mask, self.scaling, self.attention_dropout, **kwargs)
        return self.o_proj(from_heads(out, self.rank_major)), weights  # (B, T, nh * v) -> (B, T, d)


def _pruned(original: LlamaAttention, widths: dict[str, int]) -> CloverLlamaAttention:
    if "qk" in widths:
        raise ValueError("config.json records Q-K ranks for rotary (Llama) attention, which cannot be pruned")
    return CloverLlamaAttention(original.config, original.layer_idx, widths.get("vo", original.head_dim))


class CloverLlamaForCausalLM(LlamaForCausalLM):
    """:class:`LlamaForCausalLM` whose attention layers have the shapes recorded in ``config.clover``."""

    def __init__(self, config):
        super().__init__(config)
        shrink_attention(self, _pruned)
