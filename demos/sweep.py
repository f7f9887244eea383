"""What every figure script shares: a ratio sweep from one cached decomposition, and writing results.

Each figure script decomposes its model once, prunes it at every ratio with CLOVER and with the
vanilla baseline (the same kept size), measures each pruned model, and writes
``assets/results/<name>.{csv,json,html,png}``.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import clover_core as cc  # noqa: E402
from clover_core import metrics  # noqa: E402

RESULTS = ROOT / "assets" / "results"
PAPER_K = (0, 2, 4, 5, 8, 16, 32, 45, 48)  # directions removed per head (of 64) in the paper's Figure 1c
COLORS = {"clover": "#1b9e77", "vanilla": "#d95f02"}


def paper_ratios() -> list[float]:
    """The global ratios of the paper's GPT-2 XL figure, as fractions of 64 directions."""
    return [k / 64 for k in PAPER_K]


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sweep(
    dec: cc.Decomposition,
    evaluate: Callable[[torch.nn.Module], dict],
    *,
    ratios: Iterable[float],
    targets: Iterable[str],
    methods: Iterable[str] = ("vanilla", "clover"),
    mode: str = "global",
    label: str = "",
    extra: dict | None = None,
) -> list[dict]:
    """Prune ``dec`` at every (target, method, ratio) and evaluate each model; one row per model.

    The ratio-0 point is measured once per target (both methods give the original model there).
    ``extra`` holds fields added to every row after ``mode`` (e.g. ``{"scores": "calibrated"}``).
    """
    rows: list[dict] = []
    todo = [(t, m, r) for t in targets for r in ratios for m in methods]
    start = time.perf_counter()
    for i, (target, method, ratio) in enumerate(todo, 1):
        model = cc.prune(dec, ratio=ratio, target=target, method=method, mode=mode)
        row = {
            "model": label,
            "target": target,
            "method": method,
            "mode": mode,
            **(extra or {}),
            "ratio": round(ratio, 6),
            "parameters": metrics.parameter_count(model),
            "kv_bytes_per_token": metrics.kv_cache_bytes_per_token(model),
            **evaluate(model),
        }
        rows.append(row)
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k not in ("model", "mode")}
        print(f"[{i}/{len(todo)} {time.perf_counter() - start:6.0f}s] {shown}", flush=True)
        del model
    return rows


def write(name: str, rows: list[dict], fig, meta: dict | None = None) -> None:
    """``assets/results/<name>.csv`` / ``.json`` (rows + meta) / ``.html`` / ``.png``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta or {}, "rows": rows}, indent=1) + "\n")
    fig.write_html(RESULTS / f"{name}.html", include_plotlyjs="cdn")
    try:
        fig.write_image(RESULTS / f"{name}.png", width=1100, height=520, scale=1)
    except Exception as e:  # noqa: BLE001 - PNG export needs kaleido + a Chromium; the HTML is written regardless
        print(f"warning: {name}.png not written ({type(e).__name__}: {e})", file=sys.stderr)
    print(f"wrote {RESULTS / name}.{{csv,json,html,png}}")


def ratio_figure(
    rows: list[dict],
    panels: list[tuple[str, str]],
    title: str,
    *,
    log_y: bool = True,
    facet: str = "target",
    dashes: dict[str, str] | None = None,
):
    """A grid of CLOVER and vanilla curves against the ratio: one row per ``(metric key, axis label)``
    in ``panels``, one column per value of ``facet`` (Q-K / V-O). ``dashes`` (``{scores: dash}``) draws
    one curve per method and value of the rows' ``"scores"``, dashed as it says."""
    from plotly.subplots import make_subplots

    columns = list(dict.fromkeys(r[facet] for r in rows))
    fig = make_subplots(
        rows=len(panels),
        cols=len(columns),
        shared_xaxes=True,
        horizontal_spacing=0.06,
        subplot_titles=[f"{label} - {facet} {c}" for _, label in panels for c in columns],
    )
    series = [(None, None)] if dashes is None else list(dashes.items())
    for row, (metric, label) in enumerate(panels, 1):
        for col, column in enumerate(columns, 1):
            for scores, dash in series:
                for method in ("vanilla", "clover"):
                    mine = [r for r in rows if r[facet] == column and r["method"] == method]
                    pts = sorted((r["ratio"], r[metric]) for r in mine if scores is None or r["scores"] == scores)
                    name = "CLOVER" if method == "clover" else "vanilla"
                    name = name if scores is None else f"{name}, {scores}"
                    fig.add_scatter(
                        x=[100 * x for x, _ in pts],
                        y=[y for _, y in pts],
                        mode="lines+markers",
                        name=name,
                        legendgroup=method if scores is None else name,
                        showlegend=row == 1 and col == 1,
                        line={"color": COLORS[method], "dash": dash},
                        row=row,
                        col=col,
                        hovertemplate="%{x:.1f}% removed<br>%{y:.4g}<extra>"
                        + (method if scores is None else name)
                        + "</extra>",
                    )
            fig.update_yaxes(type="log" if log_y else "linear", row=row, col=col)
        fig.update_yaxes(title_text=label, row=row, col=1)
    fig.update_xaxes(title_text="directions removed (%)", row=len(panels))
    fig.update_layout(
        title=title, template="plotly_white", height=160 + 330 * len(panels), legend={"orientation": "h", "y": -0.12}
    )
    return fig
