"""CLOVER-FT against LoRA, PiSSA and full fine-tuning on a held-out domain: John Milton's *Paradise
Lost* (assets/texts/paradise_lost.txt), and recovery after pruning half of V-O.

Every method trains on the same batches (Books I-VIII), for the same steps, from the same seed;
the adapters get the same trainable-parameter budget as CLOVER-FT (LoRA/PiSSA rank chosen to match,
on the projections CLOVER-FT changes); each method's learning rate is the best of a small sweep on
the validation book (IX); the selected runs are scored on the test book (X). Every model is merged
before it is measured, so the scores are those of plain models of the base size.

    python demos/finetune_compare.py                                   # smollm2-135m, a CPU budget
    python demos/finetune_compare.py --model assets/gpt2-shakespeare --steps 300 --batch 8 --seq 256
    python demos/finetune_compare.py --steps 500 --batch 16 --seq 512 --test-tokens 0 --device cuda

Recovery: 50% of all V-O directions removed with one global threshold, CLOVER-pruned + CLOVER-FT
against vanilla-pruned + LoRA (and CLOVER-pruned + LoRA, to separate the pruning from the tuning).
Writes assets/results/finetune/finetune_<model>.{csv,json,html,png}, and logs every finished run to
finetune_<model>_runs.jsonl: the same command resumes where it stopped, a wider ``--lr-*`` grid trains
only its new points, and ``--experiments adapt`` / ``--experiments recover`` can run side by side.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from sweep import cc, metrics, pick_device

from clover_core.data import bundled_text

OUT = Path(__file__).resolve().parent.parent / "assets" / "results" / "finetune"
COLORS = {"none": "#999999", "clover": "#1b9e77", "lora": "#d95f02", "pissa": "#7570b3", "full": "#e7298a"}
LABELS = {"none": "no fine-tuning", "clover": "CLOVER-FT", "lora": "LoRA", "pissa": "PiSSA", "full": "full FT"}


@dataclass(frozen=True)
class Run:
    """One training run: a base model, a method and a learning rate."""

    experiment: str  # "adapt" or "recover"
    base: str  # "original", "clover-pruned", "vanilla-pruned"
    method: str  # "clover", "lora", "pissa", "full"
    lr: float


def split_books(text: str) -> dict[str, str]:
    """Paradise Lost (1667, ten books) -> train (I-VIII), validation (IX), test (X)."""
    starts = [m.start() for m in re.finditer(r"^BOOK [IVX]+\.? *$", text, flags=re.M)]
    if len(starts) != 10:
        raise ValueError(f"expected the 10 books of the 1667 Paradise Lost, found {len(starts)} headings")
    return {"train": text[: starts[8]], "val": text[starts[8] : starts[9]], "test": text[starts[9] :]}


def token_splits(tokenizer, val_tokens: int, test_tokens: int) -> dict[str, torch.Tensor]:
    books = split_books(bundled_text("paradise_lost"))
    ids = {k: tokenizer(v, add_special_tokens=False, return_tensors="pt")["input_ids"][0] for k, v in books.items()}
    ids["val"] = ids["val"][: val_tokens or None]
    ids["test"] = ids["test"][: test_tokens or None]
    return ids


def batches(train: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """The same random windows, in the same order, for every run."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, train.numel() - seq, (steps, batch), generator=gen)
    return [torch.stack([train[s : s + seq] for s in row.tolist()]) for row in starts]


# --------------------------------------------------------------------------- methods


def lora_targets(model: torch.nn.Module, target: str, mlp: bool) -> list[str]:
    """Names of the layers CLOVER-FT changes (LoRA and PiSSA go on the same layers)."""
    llama = hasattr(model.config, "num_key_value_heads")
    if llama:
        pairs = {"qk": ["k_proj"], "vo": ["v_proj", "o_proj"]}
        suffixes = [s for p in (("qk", "vo") if target == "both" else (target,)) for s in pairs[p]] + ["up_proj"] * mlp
    else:  # GPT-2: the fused q|k|v projection and the attention output projection
        suffixes = ["attn.c_attn"] + ["attn.c_proj"] * (target != "qk") + ["mlp.c_fc"] * mlp
    names = [n for n, m in model.named_modules() if any(n.endswith(s) for s in suffixes) and hasattr(m, "weight")]
    if not names:
        raise ValueError(f"no layers named {suffixes} in {type(model).__name__}")
    return names


def lora_rank(model: torch.nn.Module, names: list[str], budget: int) -> int:
    """The LoRA rank whose parameter count is closest to ``budget`` (``r * (in + out)`` per layer)."""
    per_rank = sum(sum(model.get_submodule(n).weight.shape) for n in names)
    return max(1, round(budget / per_rank))


def prepare(run: Run, base: torch.nn.Module, args, budget: int | None):
    """A trainable copy of ``base``: ``(model to train, parameters, merge function, trainable count)``."""
    model = copy.deepcopy(base)
    if run.method == "full":
        model.requires_grad_(True)
        params = list(model.parameters())
        return model, params, lambda: model, sum(p.numel() for p in params)
    if run.method == "clover":
        ft = cc.finetune.prepare(model, args.target, mlp=args.mlp)
        return ft.model, list(ft.parameters()), ft.merge, ft.trainable_parameters()[0]
    from peft import LoraConfig, get_peft_model

    names = lora_targets(model, args.target, args.mlp)
    r = lora_rank(model, names, budget)
    gpt2 = not hasattr(model.config, "num_key_value_heads")
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        target_modules=names,
        fan_in_fan_out=gpt2,
        init_lora_weights="pissa" if run.method == "pissa" else True,
    )
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, params, peft_model.merge_and_unload, sum(p.numel() for p in params)


def train(model, params, lr: float, data: list[torch.Tensor], device: torch.device) -> list[float]:
    """AdamW (no weight decay), linear warm-up over 10% of the steps then linear decay, clip 1.0.
    Dropout stays off (eval mode) for every method."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, len(data) // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (len(data) - s) / max(1, len(data) - warmup)))
    )
    losses = []
    model.eval()
    for x in data:
        x = x.to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def ppl(model, ids: torch.Tensor, seq: int) -> float:
    return metrics.perplexity(model, ids, window=seq, stride=seq, progress=False)


# --------------------------------------------------------------------------- the comparison


SETTINGS = (
    "model",
    "steps",
    "batch",
    "seq",
    "val_tokens",
    "test_tokens",
    "target",
    "mlp",
    "seed",
    "prune_ratio",
    "prune_mode",
)
BASELINES = {"adapt": ("original",), "recover": ("clover-pruned", "vanilla-pruned")}


def plan_runs(args) -> list[Run]:
    """Every run of the comparison, the no-fine-tuning baselines included."""
    grids = {m: [float(x) for x in getattr(args, f"lr_{m}").split(",")] for m in ("clover", "lora", "pissa", "full")}
    experiments = args.experiments.split(",")
    runs = [Run(e, base, "none", 0.0) for e in experiments for base in BASELINES[e]]
    if "adapt" in experiments:
        runs += [Run("adapt", "original", m, lr) for m in args.methods.split(",") for lr in grids[m]]
    if "recover" in experiments:
        for base, method in (("clover-pruned", "clover"), ("clover-pruned", "lora"), ("vanilla-pruned", "lora")):
            runs += [Run("recover", base, method, lr) for lr in grids[method]]
    return runs


class RunLog:
    """Finished runs, one JSON line each, keyed by the settings: rerunning the same command skips
    them (long CPU runs resume), and a wider learning-rate grid trains only its new points."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings, self.done = path, settings, {}
        if path.is_file():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                if entry["settings"] == settings:
                    self.done[Run(**entry["run"])] = entry

    def add(self, run: Run, row: dict, info: dict) -> None:
        entry = {"settings": self.settings, "run": run.__dict__, "row": row, "info": info}
        self.done[run] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def clover_budget(model, args) -> int:
    """CLOVER-FT's trainable parameters on ``model``: the budget every adapter is matched to."""
    return cc.finetune.prepare(copy.deepcopy(model), args.target, mlp=args.mlp).trainable_parameters()[0]


def execute(todo: list[Run], args, runlog: RunLog) -> None:
    """Train and measure the runs not in ``runlog`` yet, logging each as soon as it is done."""
    device = pick_device(args.device)
    bundle = cc.load_model(args.model)
    base = bundle.model.float().to(device).eval()
    ids = token_splits(bundle.processor, args.val_tokens, args.test_tokens)
    data = batches(ids["train"], args.steps, args.batch, args.seq, args.seed)
    bases = {"original": base}
    if any(run.experiment == "recover" for run in todo):
        dec = cc.decompose(base)
        for method in ("clover", "vanilla"):
            bases[f"{method}-pruned"] = cc.prune(
                dec, ratio=args.prune_ratio, target="vo", method=method, mode=args.prune_mode
            )
        del dec
    budgets = {"adapt": "original", "recover": "clover-pruned"}
    budgets = {e: clover_budget(bases[b], args) for e, b in budgets.items() if b in bases}
    info = {"device": str(device), "tokens": {k: int(v.numel()) for k, v in ids.items()}, "budgets": budgets}
    for i, run in enumerate(todo, 1):
        start = time.perf_counter()
        if run.method == "none":
            m = bases[run.base]
            row = dict(
                trainable=0,
                params=metrics.parameter_count(m),
                val_ppl=ppl(m, ids["val"], args.seq),
                test_ppl=ppl(m, ids["test"], args.seq),
                loss_first=None,
                loss_last=None,
            )
        else:
            row = one_run(run, bases[run.base], args, data, ids, device, budgets[run.experiment])
        row["seconds"] = round(time.perf_counter() - start, 1)
        runlog.add(run, row, info)
        log(
            f"[{i}/{len(todo)}] {run.base:>15} {LABELS[run.method]:>13} lr {run.lr:.0e}: trainable {row['trainable']:,}, "
            f"val {row['val_ppl']:.3f}, test {row['test_ppl']:.3f} ({row['seconds']:.0f}s)"
        )


def compare(args) -> tuple[list[dict], dict]:
    """Every planned run (trained now or found in the run log), each method's best learning rate by
    validation perplexity marked ``selected``."""
    began = time.perf_counter()
    settings = {k: getattr(args, k) for k in SETTINGS}
    runlog = RunLog(OUT / f"{args.name}_runs.jsonl", settings)
    runs = plan_runs(args)
    todo = [run for run in runs if run not in runlog.done]
    log(f"{len(runs) - len(todo)} of {len(runs)} runs found in {runlog.path.name}; training {len(todo)}")
    if todo:
        execute(todo, args, runlog)
    rows = [dict(experiment=r.experiment, base=r.base, method=r.method, lr=r.lr, **runlog.done[r]["row"]) for r in runs]
    for key in {(r["experiment"], r["base"], r["method"]) for r in rows}:
        group = [r for r in rows if (r["experiment"], r["base"], r["method"]) == key]
        best = min(group, key=lambda r: r["val_ppl"])
        for r in group:
            r["selected"] = r is best
    info = runlog.done[runs[0]]["info"]
    meta = dict(
        settings,
        **info,
        seconds_this_invocation=round(time.perf_counter() - began),
        seconds_all_runs=round(sum(r["seconds"] for r in rows)),
        command="python demos/finetune_compare.py " + " ".join(sys.argv[1:]),
        protocol="train Books I-VIII, select each method's lr on Book IX (val), score Book X (test); "
        f"non-overlapping windows of {args.seq} tokens; AdamW, no weight decay, 10% warm-up, "
        "linear decay, clip 1.0; every model merged before it is measured",
    )
    return rows, meta


def one_run(run: Run, base, args, data, ids, device, budget: int) -> dict:
    torch.manual_seed(args.seed)
    model, params, merge, trainable = prepare(run, base, args, budget)
    losses = train(model, params, run.lr, data, device)
    merged = merge()
    merged.requires_grad_(False)
    tail = max(1, len(losses) // 10)
    diverged = not all(math.isfinite(x) for x in losses)
    return dict(
        trainable=trainable,
        params=metrics.parameter_count(merged),
        val_ppl=math.inf if diverged else ppl(merged, ids["val"], args.seq),  # never selected
        test_ppl=math.inf if diverged else ppl(merged, ids["test"], args.seq),
        loss_first=sum(losses[:tail]) / tail,
        loss_last=sum(losses[-tail:]) / tail,
    )


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- output


def figure(rows: list[dict], title: str, pruning: str):
    """Test perplexity of each selected run (adaptation, recovery) and the validation sweep."""
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=3,
        horizontal_spacing=0.08,
        column_widths=[0.34, 0.38, 0.28],
        subplot_titles=[
            "adaptation: test perplexity (Book X)",
            f"recovery after {pruning}: test perplexity",
            "learning-rate sweep: validation perplexity (Book IX)",
        ],
    )
    chosen = [r for r in rows if r["selected"]]
    for col, experiment in ((1, "adapt"), (2, "recover")):
        for r in (r for r in chosen if r["experiment"] == experiment):
            name = LABELS[r["method"]] if experiment == "adapt" else f"{r['base']}<br>{LABELS[r['method']]}"
            fig.add_bar(
                x=[name],
                y=[r["test_ppl"]],
                marker_color=COLORS[r["method"]],
                showlegend=False,
                text=[f"{r['test_ppl']:.2f}"],
                textposition="outside",
                row=1,
                col=col,
                hovertemplate=f"trainable {r['trainable']:,}<br>lr {r['lr']:g}<extra></extra>",
            )
    for method in ("clover", "lora", "pissa", "full"):
        pts = sorted((r["lr"], r["val_ppl"]) for r in rows if r["experiment"] == "adapt" and r["method"] == method)
        if pts:
            fig.add_scatter(
                x=[x for x, _ in pts],
                y=[y for _, y in pts],
                mode="lines+markers",
                name=LABELS[method],
                line={"color": COLORS[method]},
                row=1,
                col=3,
            )
    fig.update_xaxes(type="log", title_text="learning rate", row=1, col=3)
    fig.update_yaxes(title_text="perplexity", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=560, legend={"orientation": "h", "y": -0.2})
    return fig


def write(name: str, rows: list[dict], fig, meta: dict) -> None:
    """``assets/results/finetune/<name>.{csv,json,html}`` and ``.png`` when kaleido can render it."""
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (OUT / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    fig.write_html(OUT / f"{name}.html", include_plotlyjs="cdn")
    try:
        fig.write_image(OUT / f"{name}.png", width=1400, height=560)
    except Exception as e:  # noqa: BLE001 - PNG export needs kaleido and a browser; the HTML is written regardless
        print(f"note: {name}.png not written ({type(e).__name__}: {e})", file=sys.stderr)
    print(f"wrote {OUT / name}.{{csv,json,html}}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="any causal LM: an embedded name, a folder, a hub id")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64, help="training and evaluation window (tokens)")
    p.add_argument("--val-tokens", type=int, default=1024, help="Book IX tokens for the sweep; 0 = all")
    p.add_argument("--test-tokens", type=int, default=4096, help="Book X tokens for the score; 0 = all")
    p.add_argument("--target", default="both", choices=["qk", "vo", "both"])
    p.add_argument("--mlp", action="store_true", help="also train the MLP up-projection (blocks of 64)")
    p.add_argument("--methods", default="clover,lora,pissa,full")
    p.add_argument("--lr-clover", default="3e-3,1e-2,3e-2")
    p.add_argument("--lr-lora", default="3e-3,1e-2,3e-2")
    p.add_argument("--lr-pissa", default="3e-4,1e-3,3e-3")
    p.add_argument("--lr-full", default="3e-5,1e-4,3e-4")
    p.add_argument("--prune-ratio", type=float, default=0.5)
    p.add_argument("--prune-mode", default="global", choices=["global", "uniform"])
    p.add_argument("--experiments", default="adapt,recover", help="adapt, recover or both (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0 = torch's default; 1 is faster on a busy machine)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model).name if Path(args.model).is_dir() else args.model)
    args.name = f"finetune_{slug}"
    rows, meta = compare(args)
    title = (
        f"{args.model} on Paradise Lost: CLOVER-FT vs LoRA vs PiSSA vs full fine-tuning "
        f"({args.steps} steps x {args.batch} x {args.seq} tokens, equal adapter budgets)"
    )
    pruning = f"pruning {args.prune_ratio:.0%} of V-O ({args.prune_mode})"
    write(args.name, rows, figure(rows, title, pruning), meta)


if __name__ == "__main__":
    main()
