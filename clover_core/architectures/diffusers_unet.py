"""Diffusers ``Attention`` (SDXL's UNet): every transformer block's ``attn1`` (self) and ``attn2``
(cross; text width 2048 != query width). ``to_q/to_k/to_v`` have no bias, ``to_out[0]`` has one.
Note SDXL's config ``attention_head_dim`` counts heads, not dims; we read ``heads`` off the module."""

from __future__ import annotations

import copy

from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from .base import (
    Factors,
    Family,
    RemoteCode,
    is_rank_major,
    load_input,
    load_output,
    parent_of,
    set_attributes,
    split_heads,
    split_output,
)
from .remote.modeling_clover_unet import CloverAttnProcessor, shrink

PIPELINE_PART = "unet"  # the component of a diffusion pipeline whose attention CLOVER prunes


class DiffusersAttentionAdapter:
    """Adapter for diffusers :class:`Attention` in its plain (SDXL UNet) configuration."""

    def factors(self, module: Attention) -> dict[str, Factors]:
        _check_plain(module)
        h, rm = module.heads, is_rank_major(module)  # re-pruned in place: rank-major
        q, k, v, o = module.to_q, module.to_k, module.to_v, module.to_out[0]
        return {
            "qk": (
                split_heads(q.weight.T, q.bias, h, rank_major=rm),
                split_heads(k.weight.T, k.bias, h, rank_major=rm),
            ),
            "vo": (split_heads(v.weight.T, v.bias, h, rank_major=rm), split_output(o.weight.T, h, rank_major=rm)),
        }  # (h, dq+1, qk), (h, dkv+1, qk); (h, dkv+1, v), (h, dout, v)

    def pruned(self, module: Attention, widths: dict[str, int], *, share: bool = False) -> Attention:
        _check_plain(module)
        linears = (module.to_q, module.to_k, module.to_v, module.to_out[0])
        new = copy.deepcopy(module, {id(m): m for m in linears})  # the four projections shared, then replaced
        qk, v = widths.get("qk", _dims(module)[0]), widths.get("vo", _dims(module)[1])
        shrink(new, {"qk": qk, "vo": v}, rank_major=share)  # fresh projections and the CLOVER processor
        bias = module.to_out[0].bias
        if bias is not None:
            new.to_out[0].bias = bias if share else copy.deepcopy(bias)  # b_o is untouched by V-O pruning
        return new.to(device=module.to_q.weight.device, dtype=module.to_q.weight.dtype)

    def load_factors(self, module: Attention, factors: dict[str, Factors], *, share: bool = False) -> None:
        (qa, kb), (va, ob), rm = factors["qk"], factors["vo"], module.processor.rank_major
        for linear, factor in ((module.to_q, qa), (module.to_k, kb), (module.to_v, va)):
            load_input(linear, factor, rank_major=rm, share=share)
        load_output(module.to_out[0], ob, rank_major=rm, share=share)
        set_attributes(module.processor, qk_dim=qa.shape[-1], v_dim=va.shape[-1])

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
        raise NotImplementedError(
            f"diffusers Attention with {extras or ['only_cross_attention']} is not supported; "
            "CLOVER Studio supports the plain attention of SDXL-style UNets"
        )


def input_norms(model: nn.Module, name: str) -> dict[str, nn.Module | None]:
    """``attn1`` reads its transformer block's ``norm1``; ``attn2``'s queries read ``norm2``, its keys
    and values the text encoders' states, which no norm of the UNet scales."""
    block, child = parent_of(model, name), name.rpartition(".")[2]
    if child == "attn2":
        return {"to_q": block.norm2, "to_k": None, "to_v": None}
    return {"to_q": block.norm1, "to_k": block.norm1, "to_v": block.norm1}


FAMILY = Family(
    name="diffusers-unet",
    attention=Attention,
    adapter=DiffusersAttentionAdapter(),
    kind="diffusion",
    model_class=UNet2DConditionModel,
    remote=RemoteCode("modeling_clover_unet", "CloverUNet2DConditionModel", ("AutoModel",), extra=()),
    inputs={"qk": ("to_q", "to_k"), "vo": ("to_v", None)},
    norms=input_norms,
)
