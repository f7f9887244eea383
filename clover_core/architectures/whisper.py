"""Whisper: encoder self-attention, decoder self-attention and decoder cross-attention
(``encoder_attn``); ``k_proj`` has no bias, ``q/v/out`` do; ``q`` is scaled before the attention."""

from __future__ import annotations

import copy

from torch import nn
from transformers import WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperAttention, WhisperDecoderLayer, WhisperEncoderLayer

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
from .remote.clover_attention import padded_width
from .remote.modeling_clover_whisper import CloverWhisperAttention


class WhisperAdapter:
    """Adapter for :class:`WhisperAttention` (self- and cross-attention)."""

    def factors(self, module: WhisperAttention) -> dict[str, Factors]:
        h, rm = module.num_heads, is_rank_major(module)  # re-pruned in place: rank-major
        q, k, v, o = module.q_proj, module.k_proj, module.v_proj, module.out_proj
        return {
            "qk": (
                split_heads(q.weight.T, q.bias, h, rank_major=rm),
                split_heads(k.weight.T, k.bias, h, rank_major=rm),
            ),
            "vo": (split_heads(v.weight.T, v.bias, h, rank_major=rm), split_output(o.weight.T, h, rank_major=rm)),
        }  # (h, d+1, qk) twice; (h, d+1, v), (h, d, v)

    def pruned(
        self, module: WhisperAttention, widths: dict[str, int], *, share: bool = False
    ) -> CloverWhisperAttention:
        qk, v = getattr(module, "qk_dim", module.head_dim), getattr(module, "v_dim", module.head_dim)
        new = CloverWhisperAttention(module, widths.get("qk", qk), widths.get("vo", v), rank_major=share)
        bias = module.out_proj.bias
        new.out_proj.bias = bias if share else copy.deepcopy(bias)  # b_o is untouched by V-O pruning
        return new.to(device=module.q_proj.weight.device, dtype=module.q_proj.weight.dtype)

    def load_factors(self, module: CloverWhisperAttention, factors: dict[str, Factors], *, share: bool = False) -> None:
        (qa, kb), (va, ob), rm = factors["qk"], factors["vo"], module.rank_major
        for proj, factor in ((module.q_proj, qa), (module.k_proj, kb), (module.v_proj, va)):
            load_input(proj, factor, rank_major=rm, share=share)  # k_proj has no bias: its row is zero
        load_output(module.out_proj, ob, rank_major=rm, share=share)
        set_attributes(module, qk_dim=qa.shape[-1], v_dim=va.shape[-1])

    def params_per_direction(self, module: nn.Module) -> dict[str, int]:
        d = module.embed_dim
        return {"qk": (d + 1) + d, "vo": (d + 1) + d}

    def kv_width(self, module: nn.Module, ranks: dict[str, list[int]]) -> tuple[int, int] | None:
        if not module.is_causal:  # encoder self-attention and cross-attention cache nothing per token
            return None
        return sum(ranks["qk"]) + sum(ranks["vo"]), module.num_heads * sum(map(padded_width, ranks.values()))


def input_norms(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """Self-attention reads its layer's ``self_attn_layer_norm``; cross-attention's queries read the
    layer's ``encoder_attn_layer_norm``, its keys and values the encoder's final ``layer_norm``."""
    layer, child = parent_of(model, name), name.rpartition(".")[2]
    if child == "encoder_attn":
        encoder = model.get_submodule(name.rpartition(".decoder.")[0] + ".encoder")
        return {"q_proj": layer.encoder_attn_layer_norm, "k_proj": encoder.layer_norm, "v_proj": encoder.layer_norm}
    norm = layer.self_attn_layer_norm
    return {"q_proj": norm, "k_proj": norm, "v_proj": norm}


FAMILY = Family(
    name="whisper",
    attention=WhisperAttention,
    adapter=WhisperAdapter(),
    kind="speech",
    model_class=WhisperForConditionalGeneration,
    remote=RemoteCode(
        "modeling_clover_whisper", "CloverWhisperForConditionalGeneration", ("AutoModelForSpeechSeq2Seq",)
    ),
    model_types=("whisper",),
    auto_class="AutoModelForSpeechSeq2Seq",
    up_projections={WhisperEncoderLayer: "fc1", WhisperDecoderLayer: "fc1"},
    kv_width=lambda config: 2 * config.decoder_layers * config.d_model,
    inputs={"qk": ("q_proj", "k_proj"), "vo": ("v_proj", None)},
    norms=input_norms,
)
