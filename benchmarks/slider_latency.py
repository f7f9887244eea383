"""How long does moving the ratio slider take? Re-pruning from a cached decomposition, as a fraction
of the decomposition itself (no SVD runs when pruning from a ``Decomposition``).

    PYTHONPATH=. python benchmarks/slider_latency.py [--models gpt2-xl smollm2-135m] [--device cuda]

For each model: decompose once, then re-prune at several ratios and modes three ways:
``cc.prune(dec, ratio=...)`` (a new model, every weight copied), ``share_weights=True`` (a new model
whose embeddings, MLPs and norms are the original's) and ``cc.Slider(dec)(ratio)`` (one model
re-pointed: CLOVER's kept weights are slices of the cached rank-major factors; what the app's slider
uses). The slider is timed moving to each ratio from another one, far (a jump, see ``MOVE_FROM``)
and near (one step of the app's slider): a move writes only what changed. Its first call, which
builds its model skeleton, is timed on its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import clover_core as cc  # noqa: E402
from benchmarks.common import add_device_args, build_model, setup_device, timed  # noqa: E402

RATIOS = (0.25, 0.5, 0.75)
MOVE_FROM = {0.25: 0.5, 0.5: 0.75, 0.75: 0.25}  # the slider's timed jumps: 0.5 -> 0.25, 0.75 -> 0.5, 0.25 -> 0.75
STEP = 0.05  # and its timed steps (the app's slider step), from the ratio below
TARGETS = {"gpt2-xl": "qk", "gpt2-small": "qk", "smollm2-135m": "vo"}  # Llama: V-O only (rotary Q-K)


def timed_move(slider: cc.Slider, start: float, ratio: float, device: torch.device, repeats: int, **kw) -> float:
    """The fastest of ``repeats`` moves of the slider from ``start`` to ``ratio`` (the move to
    ``start`` untimed), so every timed call changes the ranks; a repeat at the same position would
    find nothing to update."""
    best = float("inf")
    for _ in range(repeats):
        slider(start, **kw)
        best = min(best, timed(lambda: slider(ratio, **kw), device, repeats=1, warmup=0))
    return best


def load(name: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The real SmolLM2 when the offline package is installed, else random weights of the same shapes."""
    if name == "smollm2-135m":
        try:
            return cc.load_model(name).model.to(device), "real weights"
        except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
            print(f"  ({name} not available offline: {e}; using a config of the same shape)")
    return build_model(name, device), "random weights, real shapes"


def run_model(name: str, device: torch.device, args: argparse.Namespace) -> None:
    model, what = load(name, device)
    params = sum(p.numel() for p in model.parameters())
    print(f"\n== {name} ({params / 1e6:.0f}M parameters, {what}), target {TARGETS[name]}")
    dec = None

    def decompose() -> None:
        nonlocal dec
        dec = cc.decompose(model)

    t_dec = timed(decompose, device, repeats=args.repeats_decompose, warmup=0)
    target = TARGETS[name]
    print(f"  decompose once                 {t_dec:8.3f} s")
    slider = cc.Slider(dec)
    t_first = timed(lambda: slider(0.5, target=target), device, repeats=1, warmup=0)
    print(f"  Slider(dec) first call         {t_first:8.3f} s  (builds the pruned skeleton once)")
    print("  re-prune (no SVD), share of decompose (target < 2%):")
    print("    mode     ratio   prune (copies)        share_weights=True    Slider: jump          Slider: step")
    for mode in ("uniform", "global"):
        for ratio in RATIOS:
            times = [
                timed(
                    lambda: cc.prune(dec, ratio=ratio, target=target, mode=mode, share_weights=share),
                    device,
                    repeats=args.repeats,
                )
                for share in (False, True)
            ]
            for start in (MOVE_FROM[ratio], ratio - STEP):
                times.append(timed_move(slider, start, ratio, device, args.repeats, target=target, mode=mode))
            print(f"    {mode:<8} {ratio:<5}" + "".join(f"   {t:8.4f} s ({100 * t / t_dec:5.2f}%)" for t in times))
    print(f"  (Slider jump: moved from the ratio {MOVE_FROM}; step: from the ratio {STEP} below, the app's step)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(parser)
    parser.add_argument("--models", nargs="+", default=["gpt2-xl", "smollm2-135m"], choices=list(TARGETS))
    parser.add_argument("--repeats", type=int, default=3, help="runs per prune (best kept)")
    parser.add_argument("--repeats-decompose", type=int, default=1, help="runs of decompose (best kept)")
    args = parser.parse_args(argv)
    device = setup_device(args)
    with torch.no_grad():
        for name in args.models:
            run_model(name, device, args)


if __name__ == "__main__":
    main()
