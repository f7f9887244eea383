"""Llama family (SmolLM2 included): grouped-query attention and RoPE.

Only V-O is orthogonalized: the rotary embedding sits between ``W_q`` and ``W_k``, so the Q-K product
is not a fixed matrix. With grouped-query attention one value head serves ``g`` query heads, so the
shared ``W_v,g`` is orthogonalized against the stacked ``[W_o,h1 ... W_o,hg]`` of its group and the
KV head keeps one basis.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from .base import (
    Factors,
    Family,
    RemoteCode,
    grouped_kv_width,
    is_rank_major,
    load_input,
    load_output,
    parent_of,
    set_attributes,
    split_heads,
    split_output,
)
from .remote.clover_attention import padded_width
from .remote.modeling_clover_llama import CloverLlamaAttention


class LlamaAdapter:
    """Adapter for :class:`LlamaAttention`: V-O only, grouped basis for shared KV heads."""

    def factors(self, module: LlamaAttention) -> dict[str, Factors]:
        cfg, rm = module.config, is_rank_major(module)  # re-pruned in place: rank-major
        kv, g = cfg.num_key_value_heads, module.num_key_value_groups
        v, o = module.v_proj, module.o_proj
        a = split_heads(v.weight.T, v.bias, kv, rank_major=rm)  # (kv, d+1, hd)
        b = split_output(o.weight.T, kv * g, rank_major=rm)  # (heads, d, hd): query head h uses KV head h // g
        b = b.reshape(kv, g * b.shape[1], b.shape[2])  # (kv, g*d, hd): the group's W_o blocks stacked
        return {"vo": (a, b)}

    def pruned(self, module: LlamaAttention, widths: dict[str, int], *, share: bool = False) -> CloverLlamaAttention:
        if "qk" in widths:
            raise ValueError("Q-K pruning does not apply to rotary (Llama-family) attention; use target='vo'")
        new = CloverLlamaAttention(module.config, module.layer_idx, widths.get("vo", _v_dim(module)), rank_major=share)
        keep = (lambda m: m) if share else copy.deepcopy
        new.q_proj, new.k_proj = keep(module.q_proj), keep(module.k_proj)  # untouched
        if module.o_proj.bias is not None:
            new.o_proj.bias = keep(module.o_proj.bias)  # b_o is untouched by V-O pruning
        return new.to(device=module.v_proj.weight.device, dtype=module.v_proj.weight.dtype)

    def load_factors(self, module: CloverLlamaAttention, factors: dict[str, Factors], *, share: bool = False) -> None:
        a, b = factors["vo"]
        g, w, rm = module.num_key_value_groups, a.shape[-1], module.rank_major
        load_input(module.v_proj, a, rank_major=rm, share=share)
        heads = b.reshape(b.shape[0] * g, b.shape[1] // g, w)  # (heads, d, v)
        load_output(module.o_proj, heads, rank_major=rm, share=share)
        set_attributes(module, v_dim=w)

    def params_per_direction(self, module: nn.Module) -> dict[str, int]:
        cfg = module.config
        d, g = cfg.hidden_size, module.num_key_value_groups
        return {"vo": d + int(bool(cfg.attention_bias)) + g * d}

    def kv_width(self, module: nn.Module, ranks: dict[str, list[int]]) -> tuple[int, int]:
        keys = module.config.num_key_value_heads * module.head_dim
        return keys + sum(ranks["vo"]), keys + len(ranks["vo"]) * padded_width(ranks["vo"])


def _v_dim(module: LlamaAttention) -> int:
    return getattr(module, "v_dim", module.head_dim)


def input_norms(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """``v_proj`` reads the decoder layer's ``input_layernorm`` (an RMSNorm)."""
    return {"v_proj": parent_of(model, name).input_layernorm}


FAMILY = Family(
    name="llama",
    attention=LlamaAttention,
    adapter=LlamaAdapter(),
    kind="lm",
    model_class=LlamaForCausalLM,
    remote=RemoteCode("modeling_clover_llama", "CloverLlamaForCausalLM", ("AutoModelForCausalLM",)),
    model_types=("llama",),
    auto_class="AutoModelForCausalLM",
    up_projections={LlamaMLP: "up_proj"},
    kv_width=grouped_kv_width,
    inputs={"vo": ("v_proj", None)},
    norms=input_norms,
)
