"""Uniform vs global pruning at the same overall ratio: every head keeps round(64 * (1 - ratio))
directions (the paper's Table 1), or one threshold over all heads decides (its Figure 1c).

    python demos/fig_uniform_vs_global.py                          # gpt2-shakespeare, Q-K
    python demos/fig_uniform_vs_global.py --model openai-community/gpt2-xl --tokens 0 --device cuda
"""

from __future__ import annotations

import argparse

from sweep import cc, metrics, pick_device, sweep, write

from clover_core.data import wikitext_ids

TABLE1 = {
    0.125: (33.76, 15.89),
    0.25: (78.36, 17.45),
    0.375: (159.4, 20.95),
    0.5: (338.9, 35.12),
    0.625: (538.5, 85.25),
    0.75: (708.8, 187.4),
}  # the paper's Table 1, GPT-2 XL: vanilla, CLOVER


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-shakespeare")
    p.add_argument("--target", default="qk", choices=["qk", "vo"])
    p.add_argument("--tokens", type=int, default=8192, help="WikiText-2 test tokens; 0 = all")
    p.add_argument("--ratios", default="0,0.125,0.25,0.375,0.5,0.625,0.75")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    bundle = cc.load_model(args.model)
    model = bundle.model.to(device)
    window = min(1024, getattr(model.config, "n_positions", None) or 1024)
    ids = wikitext_ids(bundle.processor, args.tokens or None)
    ratios = [float(r) for r in args.ratios.split(",")]

    def evaluate(m):
        return {"ppl_wikitext2": metrics.perplexity(m, ids, window=window, stride=window // 2, progress=False)}

    dec = cc.decompose(model, progress=True)
    rows = [
        row
        for mode in ("uniform", "global")
        for row in sweep(dec, evaluate, ratios=ratios, targets=[args.target], mode=mode, label=args.model)
    ]
    fig = _figure(rows, args)
    meta = {
        "model": args.model,
        "target": args.target,
        "device": str(device),
        "tokens": int(ids.numel()),
        "window": window,
        "stride": window // 2,
        "command": f"python demos/fig_uniform_vs_global.py --model {args.model} --target {args.target} "
        f"--tokens {args.tokens}",
    }
    write(f"uniform_vs_global_{args.model.split('/')[-1]}_{args.target}", rows, fig, meta)
    if "gpt2-xl" in args.model and args.target == "qk":
        print("\nuniform Q-K, ours vs the paper's Table 1 (vanilla / CLOVER)")
        for r in ratios[1:]:
            got = {x["method"]: x["ppl_wikitext2"] for x in rows if x["mode"] == "uniform" and x["ratio"] == r}
            print(f"{r:6.3f}: {got['vanilla']:8.2f} / {got['clover']:8.2f}   paper {TABLE1[r][0]} / {TABLE1[r][1]}")


def _figure(rows, args):
    import plotly.graph_objects as go
    from sweep import COLORS

    fig = go.Figure()
    for method in ("vanilla", "clover"):
        for mode, dash in (("uniform", "dot"), ("global", "solid")):
            pts = sorted((r["ratio"], r["ppl_wikitext2"]) for r in rows if r["method"] == method and r["mode"] == mode)
            fig.add_scatter(
                x=[100 * x for x, _ in pts],
                y=[y for _, y in pts],
                mode="lines+markers",
                name=f"{'CLOVER' if method == 'clover' else 'vanilla'}, {mode}",
                line={"color": COLORS[method], "dash": dash},
            )
    fig.update_layout(
        title=f"{args.model}: {args.target.upper()} pruning, uniform vs global, WikiText-2 perplexity",
        xaxis_title="directions removed (%)",
        yaxis_title="perplexity",
        yaxis_type="log",
        template="plotly_white",
    )
    return fig


if __name__ == "__main__":
    main()
