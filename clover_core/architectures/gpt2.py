"""GPT-2: the fused ``Conv1D`` ``c_attn`` (stored ``(in, out)``, i.e. already ``x @ W``), ``c_proj``,
biases on all four projections. Every size, ``gpt2`` to ``gpt2-xl`` (48 layers, 25 heads, d=1600)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention

from .base import (
    Factors,
    Family,
    RemoteCode,
    assign,
    input_projection,
    is_rank_major,
    load_input,
    load_output,
    parent_of,
    set_attributes,
    split_heads,
    split_output,
)
from .remote.clover_attention import padded_width
from .remote.modeling_clover_gpt2 import CloverGPT2Attention


class GPT2Adapter:
    """Adapter for :class:`GPT2Attention` (self-attention only)."""

    def factors(self, module: GPT2Attention) -> dict[str, Factors]:
        h = module.num_heads
        if is_rank_major(module):  # re-pruned in place: separate, rank-major projections
            q, k, v, o = module.q_proj, module.k_proj, module.v_proj, module.c_proj
            return {
                "qk": (
                    split_heads(q.weight, q.bias, h, rank_major=True),
                    split_heads(k.weight, k.bias, h, rank_major=True),
                ),
                "vo": (split_heads(v.weight, v.bias, h, rank_major=True), split_output(o.weight, h, rank_major=True)),
            }
        if module.is_cross_attention:
            raise NotImplementedError("GPT-2 cross-attention (add_cross_attention=True) is not supported")
        qk_dim, v_dim = _dims(module)
        w, b = module.c_attn.weight, module.c_attn.bias  # (d, h*(2qk+v)), x @ W
        wq, wk, wv = w.split([h * qk_dim, h * qk_dim, h * v_dim], dim=1)
        bq, bk, bv = b.split([h * qk_dim, h * qk_dim, h * v_dim])
        return {
            "qk": (split_heads(wq, bq, h), split_heads(wk, bk, h)),  # (h, d+1, qk) each
            "vo": (split_heads(wv, bv, h), split_output(module.c_proj.weight, h)),  # (h, d+1, v), (h, d, v)
        }

    def pruned(self, module: GPT2Attention, widths: dict[str, int], *, share: bool = False) -> CloverGPT2Attention:
        qk_dim, v_dim = _dims(module)
        new = CloverGPT2Attention(
            module.config, module.layer_idx, widths.get("qk", qk_dim), widths.get("vo", v_dim), rank_major=share
        )
        new.c_proj.bias = module.c_proj.bias if share else copy.deepcopy(module.c_proj.bias)  # b_o: not pruned
        weight = module.c_proj.weight
        return new.to(device=weight.device, dtype=weight.dtype)

    def load_factors(self, module: CloverGPT2Attention, factors: dict[str, Factors], *, share: bool = False) -> None:
        (qa, kb), (va, ob), rm = factors["qk"], factors["vo"], module.rank_major
        if rm:
            for proj, factor in ((module.q_proj, qa), (module.k_proj, kb), (module.v_proj, va)):
                load_input(proj, factor, rank_major=True, share=share, x_at_w=True)
        else:  # one fused c_attn: its concatenation copies, so the pieces may be views
            pieces = [input_projection(f, rank_major=False, share=True, x_at_w=True) for f in (qa, kb, va)]
            assign(module.c_attn, "weight", torch.cat([w for w, _ in pieces], dim=1), share=False)
            assign(module.c_attn, "bias", torch.cat([b for _, b in pieces]), share=False)
            set_attributes(module.c_attn, nf=module.c_attn.bias.shape[0])
        load_output(module.c_proj, ob, rank_major=rm, share=share, x_at_w=True)
        set_attributes(module, qk_dim=qa.shape[-1], v_dim=va.shape[-1])

    def params_per_direction(self, module: nn.Module) -> dict[str, int]:
        d = module.embed_dim
        return {"qk": 2 * (d + 1), "vo": (d + 1) + d}

    def kv_width(self, module: nn.Module, ranks: dict[str, list[int]]) -> tuple[int, int]:
        true = sum(ranks["qk"]) + sum(ranks["vo"])
        return true, module.num_heads * (padded_width(ranks["qk"]) + padded_width(ranks["vo"]))


def _dims(module: GPT2Attention) -> tuple[int, int]:
    return getattr(module, "qk_dim", module.head_dim), getattr(module, "v_dim", module.head_dim)


def input_norms(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """``c_attn`` reads the block's ``ln_1``."""
    return {"c_attn": parent_of(model, name).ln_1}


FAMILY = Family(
    name="gpt2",
    attention=GPT2Attention,
    adapter=GPT2Adapter(),
    kind="lm",
    model_class=GPT2LMHeadModel,
    remote=RemoteCode("modeling_clover_gpt2", "CloverGPT2LMHeadModel", ("AutoModelForCausalLM",)),
    model_types=("gpt2",),
    auto_class="AutoModelForCausalLM",
    up_projections={GPT2MLP: "c_fc"},
    kv_width=lambda config: 2 * config.n_layer * config.n_embd,
    inputs={"qk": ("c_attn", "c_attn"), "vo": ("c_attn", None)},
    norms=input_norms,
)
