"""The paper's central figure: GPT-2 perplexity against the global pruning ratio, CLOVER vs vanilla,
Q-K and V-O separately, on WikiText-2 test (and held-out Shakespeare for `gpt2-shakespeare`).

    python demos/fig_gpt2_perplexity.py                                   # gpt2-shakespeare, CPU-sized budget
    python demos/fig_gpt2_perplexity.py --model openai-community/gpt2-xl --tokens 0 --device cuda

With `openai-community/gpt2-xl` (hub or local cache) and ``--tokens 0`` (all of WikiText-2 test,
window 1024 / stride 512) it reproduces Figure 1c of the paper and prints it beside the paper's numbers.
"""

from __future__ import annotations

import argparse

from sweep import cc, metrics, paper_ratios, pick_device, ratio_figure, sweep, write

from clover_core.data import heldout_shakespeare, wikitext_ids

# Figure 1c of the paper (GPT-2 XL, Q-K, global): removed directions per head (of 64) -> perplexity
PAPER = {
    "vanilla": [14.78, 20.70, 39.64, 60.92, 73.02, 102.9, 160.9, 452.7, 513.5],
    "clover": [14.78, 14.80, 15.21, 15.74, 17.60, 19.90, 33.04, 61.07, 100.9],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-shakespeare")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per dataset; 0 = all")
    p.add_argument("--targets", default="qk,vo")
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default=None, help="results file stem (default: from the model)")
    args = p.parse_args()
    device = pick_device(args.device)
    bundle = cc.load_model(args.model)
    model = bundle.model.to(device)
    window = min(1024, model.config.n_positions)
    limit = args.tokens or None
    data = {"wikitext2": wikitext_ids(bundle.processor, limit)}
    if args.model == "gpt2-shakespeare":
        ids = bundle.processor(heldout_shakespeare(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        data["heldout_shakespeare"] = ids[:limit]

    def evaluate(m):
        return {
            f"ppl_{k}": metrics.perplexity(m, ids, window=window, stride=window // 2, progress=False)
            for k, ids in data.items()
        }

    dec = cc.decompose(model, progress=True)
    rows = sweep(dec, evaluate, ratios=paper_ratios(), targets=args.targets.split(","), label=args.model)
    name = args.name or f"gpt2_perplexity_{args.model.split('/')[-1]}"
    meta = {
        "model": args.model,
        "device": str(device),
        "window": window,
        "stride": window // 2,
        "tokens": {k: int(v.numel()) for k, v in data.items()},
        "mode": "global",
        "command": f"python demos/fig_gpt2_perplexity.py --model {args.model} --tokens {args.tokens}",
    }
    panels = [(f"ppl_{k}", f"perplexity, {k}") for k in data]
    fig = ratio_figure(rows, panels, f"{args.model}: perplexity vs global pruning ratio, CLOVER vs vanilla")
    write(name, rows, fig, meta)
    if "gpt2-xl" in args.model:
        _compare_with_paper(rows)


def _compare_with_paper(rows: list[dict]) -> None:
    print("\nQ-K, global, WikiText-2 perplexity: ours vs the paper's Figure 1c")
    print(f"{'k/64':>6} {'vanilla':>9} {'paper':>9} {'CLOVER':>9} {'paper':>9}")
    for i, ratio in enumerate(paper_ratios()):
        got = {r["method"]: r["ppl_wikitext2"] for r in rows if r["target"] == "qk" and abs(r["ratio"] - ratio) < 1e-6}
        print(
            f"{round(ratio * 64):>6} {got['vanilla']:>9.2f} {PAPER['vanilla'][i]:>9.2f} "
            f"{got['clover']:>9.2f} {PAPER['clover'][i]:>9.2f}"
        )


if __name__ == "__main__":
    main()
