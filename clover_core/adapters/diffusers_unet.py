"""Diffusers ``Attention`` (SDXL's UNet): every transformer block's ``attn1`` (self) and ``attn2``
(cross; text width 2048 != query width). ``to_q/to_k/to_v`` have no bias, ``to_out[0]`` has one.
Note SDXL's config ``attention_head_dim`` counts heads, not dims; we read ``heads`` off the module."""

from __future__ import annotations

import copy

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..remote.modeling_clover_unet import CloverAttnProcessor, shrink
from .base import Factors, merge_heads, merge_output, split_heads, split_output


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
        new = copy.deepcopy(module, {id(m): m for m in linears})  # the four projections shared, then replaced
        qk, v = widths.get("qk", _dims(module)[0]), widths.get("vo", _dims(module)[1])
        shrink(new, {"qk": qk, "vo": v})  # fresh projections and the CLOVER processor, as a checkpoint loads
        if module.to_out[0].bias is not None:
            new.to_out[0].bias = copy.deepcopy(module.to_out[0].bias)  # b_o is untouched by V-O pruning
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
