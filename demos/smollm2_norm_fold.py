"""Does folding the RMSNorm gain into W_q/W_k/W_v help V-O pruning of SmolLM2?

Each Llama layer computes ``W_v (g * x_hat)``; the singular values of ``W_v`` alone ignore the gain
``g``. Multiplying ``g`` into the columns of ``W_q``, ``W_k`` and ``W_v`` (and setting the norm's
weight to 1) is an exact rewrite of the model, after which CLOVER ranks directions by their effect
on the normalized input. Prints WikiText-2 perplexity of CLOVER V-O uniform pruning without and with
the fold.

    python demos/smollm2_norm_fold.py [--tokens 1024] [--ratios 0.125,0.25]
"""

from __future__ import annotations

import argparse

import torch
from sweep import cc, metrics

from clover_core.data import wikitext_ids


def fold_norm_gains(model: torch.nn.Module) -> None:
    """Move every ``input_layernorm`` gain into the q/k/v projections (exact; in place)."""
    with torch.no_grad():
        for layer in model.model.layers:
            gain = layer.input_layernorm.weight.clone()
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.mul_(gain[None, :])
            layer.input_layernorm.weight.fill_(1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--ratios", default="0.125,0.25")
    args = p.parse_args()
    bundle = cc.load_model(args.model)
    model = bundle.model.eval()
    ids = wikitext_ids(bundle.processor, args.tokens)

    def ppl(m):
        return metrics.perplexity(m, ids, window=512, stride=256, progress=False)

    ratios = [float(r) for r in args.ratios.split(",")]
    plain = {r: ppl(cc.prune(model, ratio=r, target="vo", mode="uniform")) for r in ratios}
    print(f"original: {ppl(model):.2f}")
    fold_norm_gains(model)
    print(f"after the fold (must match): {ppl(model):.2f}")
    for r in ratios:
        folded = ppl(cc.prune(model, ratio=r, target="vo", mode="uniform"))
        print(f"V-O uniform {r:.3f}: CLOVER {plain[r]:,.1f} -> with the gain folded {folded:,.1f}")


if __name__ == "__main__":
    main()
