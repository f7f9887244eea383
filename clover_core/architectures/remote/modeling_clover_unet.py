"""A diffusers UNet (SDXL-style) with CLOVER-pruned attention, loadable with
``diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)``; no clover_core needed.

Every pruned ``Attention`` (``attn1`` self-attention, ``attn2`` cross-attention) keeps ``qk`` query/key
and ``v`` value features per head (the largest rank of its heads; shorter heads are zero-padded), and
uses the ORIGINAL softmax scale ``attn.scale``: diffusers' default processor would infer the scale from
the pruned key width, so a dedicated processor is installed. Projections are head-major, or rank-major
(feature ``j * heads + h`` is direction ``j`` of head ``h``) in a model re-pruned in place.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn


class CloverAttnProcessor:
    """SDPA with ``qk_dim`` query/key and ``v_dim`` value features per head and the original scale."""

    def __init__(self, qk_dim: int, v_dim: int, rank_major: bool = False):
        self.qk_dim, self.v_dim, self.rank_major = qk_dim, v_dim, rank_major

    def __call__(
        self,
        attn: Attention,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
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
        rm = self.rank_major
        q = _to_heads(attn.to_q(hidden_states), h, self.qk_dim, rm)  # (B, nh, T, qk)
        k = _to_heads(attn.to_k(context), h, self.qk_dim, rm)  # (B, nh, S, qk)
        v = _to_heads(attn.to_v(context), h, self.v_dim, rm)  # (B, nh, S, v)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = (out.permute(0, 2, 3, 1) if rm else out.transpose(1, 2)).flatten(-2)  # (B, T, nh * v)
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _to_heads(x: torch.Tensor, heads: int, width: int, rank_major: bool) -> torch.Tensor:
    """Projected features ``(B, T, heads * width)`` -> per-head ``(B, heads, T, width)``."""
    if rank_major:
        return x.unflatten(-1, (width, heads)).permute(0, 3, 1, 2).contiguous()
    return x.unflatten(-1, (heads, width)).transpose(1, 2)


def shrink(attn: Attention, widths: dict[str, int], rank_major: bool = False) -> None:
    """Give ``attn`` (in place) the projection shapes of ``widths = {"qk": w, "vo": w}`` per head."""
    h = attn.heads
    qk = widths.get("qk", attn.to_q.out_features // h)
    v = widths.get("vo", attn.to_v.out_features // h)
    for name, n_out in (("to_q", h * qk), ("to_k", h * qk), ("to_v", h * v)):
        old = getattr(attn, name)
        setattr(attn, name, nn.Linear(old.in_features, n_out, bias=old.bias is not None))
    out = attn.to_out[0]
    attn.to_out[0] = nn.Linear(h * v, out.out_features, bias=out.bias is not None)
    attn.set_processor(CloverAttnProcessor(qk, v, rank_major))


def _padded_width(ranks: list[int]) -> int:
    return max(1, max(ranks, default=0))  # the largest rank of a layer's heads, at least 1


def _attention(model: nn.Module, name: str) -> Attention:
    module = dict(model.named_modules()).get(name)
    if not isinstance(module, Attention):
        raise ValueError(f"config.json lists ranks for {name!r}, which is not an attention module of this UNet")
    return module


class CloverUNet2DConditionModel(UNet2DConditionModel):
    """:class:`UNet2DConditionModel` whose attention layers have the shapes in ``config["clover"]``.

    ``from_pretrained`` builds the model through ``from_config`` and only then reads the weights, so
    shrinking the attention there gives the weights the shapes they were saved with.
    """

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Keep ``clover`` and ``auto_map`` as registered config entries, without diffusers' warning that
        they are unexpected ``__init__`` arguments."""
        extra = {k: config_dict[k] for k in ("clover", "auto_map") if k in config_dict}
        init, unused, hidden = super().extract_init_dict(
            {k: v for k, v in config_dict.items() if k not in extra}, **kwargs
        )
        return init, unused, {**hidden, **extra}

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        model, unused = super().from_config(config, return_unused_kwargs=True, **kwargs)
        record = model.config.get("clover")
        if not isinstance(record, dict) or not isinstance(record.get("ranks"), dict):
            raise ValueError("config.json has no 'clover' entry with per-head ranks; this is not a CLOVER checkpoint")
        with torch.device(next(model.parameters()).device):
            for name, ranks in record["ranks"].items():
                shrink(_attention(model, name), {pair: _padded_width(r) for pair, r in ranks.items()})
        return (model, unused) if return_unused_kwargs else model
