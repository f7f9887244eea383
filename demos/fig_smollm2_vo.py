"""SmolLM2-135M (Llama architecture, GQA, RoPE): V-O perplexity against the pruning ratio, CLOVER vs
vanilla, on WikiText-2 test with a fixed token budget that runs on a CPU.

    python demos/fig_smollm2_vo.py                       # 4096 tokens, window 512 / stride 256
    python demos/fig_smollm2_vo.py --tokens 0 --window 2048 --device cuda

Q-K is not swept: the rotary embedding sits between W_q and W_k, so CLOVER's Q-K step does not apply.
"""

from __future__ import annotations

import argparse

from sweep import cc, metrics, pick_device, ratio_figure, sweep, write

from clover_core.data import wikitext_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=4096, help="WikiText-2 test tokens; 0 = all")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--ratios", default="0,0.125,0.25,0.375,0.5,0.625,0.75")
    p.add_argument("--mode", default="global", choices=["global", "uniform"])
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    bundle = cc.load_model(args.model)
    model = bundle.model.to(device)
    ids = wikitext_ids(bundle.processor, args.tokens or None)

    def evaluate(m):
        return {
            "ppl_wikitext2": metrics.perplexity(m, ids, window=args.window, stride=args.window // 2, progress=False)
        }

    dec = cc.decompose(model, progress=True)
    rows = sweep(
        dec,
        evaluate,
        ratios=[float(r) for r in args.ratios.split(",")],
        targets=["vo"],
        mode=args.mode,
        label=args.model,
    )
    fig = ratio_figure(
        rows,
        [("ppl_wikitext2", "perplexity, WikiText-2")],
        f"{args.model}: V-O pruning ({args.mode}), perplexity vs ratio, CLOVER vs vanilla",
    )
    meta = {
        "model": args.model,
        "device": str(device),
        "tokens": int(ids.numel()),
        "window": args.window,
        "stride": args.window // 2,
        "mode": args.mode,
        "command": f"python demos/fig_smollm2_vo.py --tokens {args.tokens} --window {args.window} --mode {args.mode}",
    }
    write(f"smollm2_vo_perplexity_{args.mode}", rows, fig, meta)


if __name__ == "__main__":
    main()
