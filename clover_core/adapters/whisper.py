"""Whisper: encoder self-attention, decoder self-attention and decoder cross-attention
(``encoder_attn``); ``k_proj`` has no bias, ``q/v/out`` do; ``q`` is scaled before the attention."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperAttention

from ..attention import padded_width
from ..remote.modeling_clover_whisper import CloverWhisperAttention
from .base import Factors, merge_heads, merge_output, split_heads, split_output


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
