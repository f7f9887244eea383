"""Diffusers ``Attention`` (SDXL's UNet): every transformer block's ``attn1`` (self) and ``attn2``
(cross; text width 2048 != query width). ``to_q/to_k/to_v`` have no bias, ``to_out[0]`` has one.
Note SDXL's config ``attention_head_dim`` counts heads, not dims; we read ``heads`` off the module."""

from __future__ import annotations

import copy

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from .base import Factors, merge_heads, merge_output, split_heads, split_output


class CloverAttnProcessor:
    """SDPA for pruned diffusers attention: ``qk_dim`` query/key and ``v_dim`` value features per
    head, and the ORIGINAL scale ``attn.scale`` (diffusers' default processor would infer the scale
    from the pruned key width)."""

    def __init__(self, qk_dim: int, v_dim: int):
        self.qk_dim, self.v_dim = qk_dim, v_dim

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual, spatial = hidden_states, hidden_states.ndim == 4
        if spatial:
            b, c, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, c, height * width).transpose(1, 2)  # (B, HW, C)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        bsz, h = hidden_states.shape[0], attn.heads
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], bsz)
            attention_mask = attention_mask.view(bsz, h, -1, attention_mask.shape[-1])
        q = attn.to_q(hidden_states).view(bsz, -1, h, self.qk_dim).transpose(1, 2)  # (B, nh, T, qk)
        k = attn.to_k(context).view(bsz, -1, h, self.qk_dim).transpose(1, 2)  # (B, nh, S, qk)
        v = attn.to_v(context).view(bsz, -1, h, self.v_dim).transpose(1, 2)  # (B, nh, S, v)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(bsz, -1, h * self.v_dim).to(q.dtype)))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class DiffusersAttentionAdapter:
    """Adapter for diffusers :class:`Attention` in its plain (SDXL UNet) configuration."""

    def factors(self, module: Attention) -> dict[str, Factors]:
        _check_plain(module)
        h = module.heads
        q, k, v, o = module.to_q, module.to_k, module.to_v, module.to_out[0]
        return {
            "qk": (split_heads(q.weight.T, q.bias, h), split_heads(k.weight.T, k.bias, h)),  # (h, dq+1, qk), (h, dkv+1, qk)
            "vo": (split_heads(v.weight.T, v.bias, h), split_output(o.weight.T, h)),  # (h, dkv+1, v), (h, dout, v)
        }

    def pruned(self, module: Attention, widths: dict[str, int]) -> Attention:
        _check_plain(module)
        linears = (module.to_q, module.to_k, module.to_v, module.to_out[0])
        new = copy.deepcopy(module, {id(m): None for m in linears})  # everything but the four projections
        qk, v, h = widths.get("qk", _dims(module)[0]), widths.get("vo", _dims(module)[1]), module.heads
        for name, old, n_in, n_out in (("to_q", module.to_q, module.to_q.in_features, h * qk),
                                       ("to_k", module.to_k, module.to_k.in_features, h * qk),
                                       ("to_v", module.to_v, module.to_v.in_features, h * v)):
            setattr(new, name, nn.Linear(n_in, n_out, bias=old.bias is not None))
        out = module.to_out[0]
        new.to_out[0] = nn.Linear(h * v, out.out_features, bias=out.bias is not None)
        if out.bias is not None:
            new.to_out[0].bias = copy.deepcopy(out.bias)  # b_o is untouched by V-O pruning
        new.set_processor(CloverAttnProcessor(qk, v))
        return new.to(device=module.to_q.weight.device, dtype=module.to_q.weight.dtype)

    def load_factors(self, module: Attention, factors: dict[str, Factors]) -> None:
        with torch.no_grad():
            for linear, factor in ((module.to_q, factors["qk"][0]), (module.to_k, factors["qk"][1]),
                                   (module.to_v, factors["vo"][0])):
                w, b = merge_heads(factor)
                linear.weight.copy_(w.T)
                if linear.bias is not None:
                    linear.bias.copy_(b)
            module.to_out[0].weight.copy_(merge_output(factors["vo"][1]).T)

    def params_per_direction(self, module: Attention) -> dict[str, int]:
        def cost(linear: nn.Linear) -> int:
            return linear.in_features + int(linear.bias is not None)

        return {"qk": cost(module.to_q) + cost(module.to_k), "vo": cost(module.to_v) + module.to_out[0].out_features}

    def kv_width(self, module: nn.Module, ranks: dict[str, list[int]]) -> None:
        return None  # a diffusion UNet keeps no KV cache


def _dims(module: Attention) -> tuple[int, int]:
    processor = module.processor
    if isinstance(processor, CloverAttnProcessor):
        return processor.qk_dim, processor.v_dim
    return module.to_q.out_features // module.heads, module.to_v.out_features // module.heads


def _check_plain(module: Attention) -> None:
    extras = [n for n in ("spatial_norm", "group_norm", "norm_q", "norm_k", "add_q_proj") if getattr(module, n, None)]
    if extras or module.only_cross_attention:
        raise NotImplementedError(f"diffusers Attention with {extras or ['only_cross_attention']} is not supported; "
                                  "CLOVER Studio supports the plain attention of SDXL-style UNets")
