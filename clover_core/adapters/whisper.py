"""Whisper: encoder self-attention, decoder self-attention and decoder cross-attention
(``encoder_attn``); ``k_proj`` has no bias, ``q/v/out`` do; ``q`` is scaled before the attention."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.whisper.modeling_whisper import WhisperAttention

from ..attention import attend, padded_width
from .base import Factors, merge_heads, merge_output, split_heads, split_output


class CloverWhisperAttention(WhisperAttention):
    """Whisper attention with ``qk_dim`` query/key and ``v_dim`` value features per head.

    ``self.scaling`` stays ``1/sqrt(d_model / heads)`` of the original and is applied to ``q`` first,
    exactly as the original module does.
    """

    def __init__(self, original: WhisperAttention, qk_dim: int, v_dim: int):
        super().__init__(original.embed_dim, original.num_heads, original.dropout, original.is_decoder,
                         True, original.is_causal, original.layer_idx, original.config)
        self.qk_dim, self.v_dim = qk_dim, v_dim
        d, h = self.embed_dim, self.num_heads
        self.q_proj = nn.Linear(d, h * qk_dim, bias=True)
        self.k_proj = nn.Linear(d, h * qk_dim, bias=False)
        self.v_proj = nn.Linear(d, h * v_dim, bias=True)
        self.out_proj = nn.Linear(h * v_dim, d, bias=True)

    def forward(self, hidden_states, key_value_states=None, past_key_values=None, attention_mask=None,
                output_attentions=False, **kwargs):
        bsz, seq = hidden_states.shape[:2]
        h, cross = self.num_heads, key_value_states is not None
        q = (self.q_proj(hidden_states) * self.scaling).view(bsz, seq, h, self.qk_dim).transpose(1, 2)  # (B,nh,T,qk)
        cache, reuse = past_key_values, False
        if isinstance(cache, EncoderDecoderCache):
            reuse = cross and bool(cache.is_updated.get(self.layer_idx))
            if cross:
                cache.is_updated[self.layer_idx] = True
            cache = cache.cross_attention_cache if cross else cache.self_attention_cache
        if reuse:
            k, v = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            source = key_value_states if cross else hidden_states
            k = self.k_proj(source).view(bsz, -1, h, self.qk_dim).transpose(1, 2)  # (B, nh, S, qk)
            v = self.v_proj(source).view(bsz, -1, h, self.v_dim).transpose(1, 2)  # (B, nh, S, v)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
        out, weights = attend(self, q, k, v, attention_mask, 1.0, self.dropout, **kwargs)  # (B, T, nh, v)
        return self.out_proj(out.reshape(bsz, seq, h * self.v_dim)), weights


class WhisperAdapter:
    """Adapter for :class:`WhisperAttention` (self- and cross-attention)."""

    def factors(self, module: WhisperAttention) -> dict[str, Factors]:
        h = module.num_heads
        q, k, v, o = module.q_proj, module.k_proj, module.v_proj, module.out_proj
        return {
            "qk": (split_heads(q.weight.T, q.bias, h), split_heads(k.weight.T, k.bias, h)),  # (h, d+1, qk)
            "vo": (split_heads(v.weight.T, v.bias, h), split_output(o.weight.T, h)),  # (h, d+1, v), (h, d, v)
        }

    def pruned(self, module: WhisperAttention, widths: dict[str, int]) -> CloverWhisperAttention:
        qk, v = getattr(module, "qk_dim", module.head_dim), getattr(module, "v_dim", module.head_dim)
        new = CloverWhisperAttention(module, widths.get("qk", qk), widths.get("vo", v))
        new.out_proj.bias = copy.deepcopy(module.out_proj.bias)  # b_o is untouched by V-O pruning
        return new.to(device=module.q_proj.weight.device, dtype=module.q_proj.weight.dtype)

    def load_factors(self, module: CloverWhisperAttention, factors: dict[str, Factors]) -> None:
        (wq, bq), (wk, _) = merge_heads(factors["qk"][0]), merge_heads(factors["qk"][1])  # k bias row stays 0
        wv, bv = merge_heads(factors["vo"][0])
        with torch.no_grad():
            for linear, w in ((module.q_proj, wq), (module.k_proj, wk), (module.v_proj, wv)):
                linear.weight.copy_(w.T)
            module.q_proj.bias.copy_(bq)
            module.v_proj.bias.copy_(bv)
            module.out_proj.weight.copy_(merge_output(factors["vo"][1]).T)

    def params_per_direction(self, module: nn.Module) -> dict[str, int]:
        d = module.embed_dim
        return {"qk": (d + 1) + d, "vo": (d + 1) + d}

    def kv_width(self, module: nn.Module, ranks: dict[str, list[int]]) -> tuple[int, int] | None:
        if not module.is_causal:  # encoder self-attention and cross-attention cache nothing per token
            return None
        return sum(ranks["qk"]) + sum(ranks["vo"]), module.num_heads * sum(map(padded_width, ranks.values()))
