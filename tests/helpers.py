"""Helpers several test files share: a model's logits, GPT-2's per-head products read straight off its
weights (an oracle independent of the engine's adapters), and whether two saved checkpoints agree."""

import torch

import clover_core as cc

from .tolerances import SAME_MATH, SAME_MATH_FP16


def logits(model, ids):
    """The model's logits for token ids ``ids``, without autograd."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_checkpoint(a, b, ids):
    """Two checkpoint folders hold the same pruning record, tensors (names, dtypes, values to the last
    bits) and logits on ``ids``."""
    ma, mb = cc.load_pruned(a), cc.load_pruned(b)
    assert ma.config.clover == mb.config.clover
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    half = any(t.dtype == torch.float16 for t in sa.values())
    tol = SAME_MATH_FP16 if half else SAME_MATH
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        torch.testing.assert_close(sa[key], sb[key], **tol, msg=key)
    torch.testing.assert_close(logits(ma.float(), ids), logits(mb.float(), ids), **tol)


def gpt2_head_products(attn) -> dict[str, torch.Tensor]:
    """Each head's Q-K product ``[W_q,h; b_q,h] [W_k,h; b_k,h]^T`` ``(h, d+1, d+1)`` and V-O product
    ``[W_v,h; b_v,h] W_o,h`` ``(h, d+1, d)`` of a GPT-2 attention module (original or pruned, head-major),
    sliced by hand from its fused ``c_attn`` and its ``c_proj``: no code of the engine is used."""
    h, d = attn.num_heads, attn.embed_dim
    qk, v = getattr(attn, "qk_dim", attn.head_dim), getattr(attn, "v_dim", attn.head_dim)
    rows = torch.cat([attn.c_attn.weight, attn.c_attn.bias[None]]).detach()  # (d + 1, h * (2 qk + v)), x @ W
    wq, wk, wv = rows.split([h * qk, h * qk, h * v], dim=1)
    q, k, wv = (t.reshape(d + 1, h, -1).transpose(0, 1) for t in (wq, wk, wv))  # (h, d + 1, width)
    o = attn.c_proj.weight.detach().reshape(h, v, d)  # (h, v, d): head h's rows of the output projection
    return {"qk": q @ k.transpose(1, 2), "vo": wv @ o}
