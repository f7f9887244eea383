"""How fast is the decomposition? The engine against the public reference code, a low-rank SVD loop,
and the memory/GEMM floor, on the attention shapes of GPT-2 XL, Whisper-large-v3 and the SDXL UNet.

    PYTHONPATH=. python benchmarks/decompose_speed.py [--models gpt2-xl ...] [--device cuda]

* engine: ``clover_core.orthogonalize`` on every attention module's Q-K and V-O factors (random
  N(0, 0.02) weights of the real shapes), batched over the heads of a module, as ``decompose`` runs it.
* reference: what the public CLOVER code does, head by head: form the head's (d+1) x (d+1)
  product, full SVD, keep the first head_dim singular triplets.
* svd_lowrank loop: head by head, ``torch.svd_lowrank`` of the product with q = head_dim.
* floor: reading every attention weight once and multiplying it once (``factor @ T`` with a
  head_dim x head_dim ``T``); the engine does two such passes plus the small per-head algebra.

The baselines run on a few heads of each distinct shape and are extrapolated linearly to every head
(each head's work is independent and identical for equal shapes); the output says so.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import add_device_args, build_model, cpu_split, gib, peak_rss_bytes, setup_device, timed  # noqa: E402
from clover_core.architectures import attention_modules  # noqa: E402
from clover_core.orthogonalize import _gram, _gram_rotation, orthogonalize  # noqa: E402

SHAPE_MODELS = ("gpt2-xl", "whisper-large-v3", "sdxl-unet")


def pair_shapes(name: str) -> list[tuple[torch.Size, torch.Size]]:
    """Every attention module's (a, b) factor shapes, both pairs, in model order (from a meta model)."""
    model = build_model(name, "meta")
    return [
        (a.shape, b.shape)
        for _, module, adapter in attention_modules(model)
        for a, b in adapter.factors(module).values()
    ]


def random_factors(shape_a, shape_b, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(shape_a, generator=gen, device=device) * 0.02
    return a, torch.randn(shape_b, generator=gen, device=device) * 0.02


def reference_head(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The public reference for ONE head: form the (m x n) product, full SVD, keep k triplets."""
    k = a.shape[-1]
    u, s, vh = torch.linalg.svd(a @ b.T, full_matrices=False)  # (m, m), (m,), (m, n) for m <= n
    root = s[:k].sqrt()
    return u[:, :k] * root, vh[:k].T * root


def lowrank_head(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.svd_lowrank`` of ONE head's product, q = head_dim (the product's exact rank)."""
    k = a.shape[-1]
    u, s, v = torch.svd_lowrank(a @ b.T, q=k, niter=2)
    root = s.sqrt()
    return u * root, v * root


def rel_error(a2: torch.Tensor, b2: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a2 b2^T - a b^T|| / ||a b^T||`` in float64 (one head)."""
    exact = a.double() @ b.double().T
    return ((a2.double() @ b2.double().T - exact).norm() / exact.norm()).item()


def time_engine_and_floor(shapes, device, repeats: int, check_heads: int) -> dict:
    """Per module: the engine and the floor, interleaved (same load), best of ``repeats`` each."""
    gen = torch.Generator(device=device).manual_seed(0)
    engine = floor = 0.0
    errors, n_bytes = [], 0
    for i, (sa, sb) in enumerate(shapes):
        a, b = random_factors(sa, sb, device, gen)
        n_bytes += (a.numel() + b.numel()) * a.element_size()
        t = torch.randn(a.shape[0], a.shape[2], a.shape[2], generator=gen, device=device)  # (G, k, k)
        engine += timed(lambda: orthogonalize(a, b), device, repeats)
        floor += timed(lambda: (a @ t, b @ t), device, repeats)
        a2, b2, _ = orthogonalize(a, b)
        errors += [rel_error(a2[h], b2[h], a[h], b[h]) for h in range(min(check_heads, a.shape[0]))]
    return {"engine": engine, "floor": floor, "max_error": max(errors), "checked": len(errors), "bytes": n_bytes}


def breakdown(shapes, device, repeats: int) -> None:
    """Where the engine's time goes, per distinct module shape, as multiples of the floor: both sides
    write into preallocated outputs (no page faults on fresh memory in either), best of ``repeats``."""
    gen = torch.Generator(device=device).manual_seed(2)
    print("  breakdown per module shape (preallocated outputs; x floor):")
    for sa, sb in dict.fromkeys((tuple(sa), tuple(sb)) for sa, sb in shapes):
        a, b = random_factors(sa, sb, device, gen)
        t = torch.randn(sa[0], sa[2], sa[2], generator=gen, device=device)
        fa, fb, oa, ob = (torch.empty_like(x) for x in (a, b, a, b))
        floor = timed(lambda: (torch.bmm(a, t, out=fa), torch.bmm(b, t, out=fb)), device, repeats)
        engine = timed(lambda: orthogonalize(a, b, out=(oa, ob)), device, repeats)
        grams = timed(lambda: (_gram(a), _gram(b)), device, repeats)
        rotation = timed(lambda: _gram_rotation(a, b), device, repeats)  # Grams + the k x k algebra
        ga, gb = _gram(a), _gram(b)
        ra = torch.linalg.cholesky(ga, upper=True)
        m = ra @ gb @ ra.mT
        eigh = timed(lambda: torch.linalg.eigh(m), device, repeats)
        parts = {
            "Grams": grams,
            "eigh": eigh,
            "other k x k": rotation - grams - eigh,
            "rotation GEMMs": engine - rotation,
        }
        cells = "  ".join(f"{k} {v / floor:.2f}" for k, v in parts.items())
        print(
            f"    {sa[0]} x {sa[1]}x{sa[2]} / {sb[1]}x{sb[2]}: floor {floor * 1e3:.2f} ms, engine "
            f"{engine / floor:.2f} = {cells}"
        )


def conditioning(names: list[str]) -> None:
    """How well-conditioned each head's eigenproblem ``R_a B^T B R_a^T`` is (``(s_max / s_min)^2`` of its
    singular values) on real offline checkpoints, against the random weights the timings use: the
    case for (or against) a cheaper float32 eigensolve where the conditioning allows it."""
    import clover_core as cc

    print("\n== eigenproblem conditioning, log10 (s_max / s_min)^2 per head: min / median / max")
    for name in names:
        model = build_model("whisper-large-v3", "cpu") if name == "random" else cc.load_model(name).model
        dec = cc.decompose(model)
        for pair in dec.pair_types:
            s = torch.cat([md.pairs[pair].s for md in dec.modules.values()]).double()
            cond = (s[:, 0] / s[:, -1]).square().log10()  # inf where a head is rank-deficient
            q = [cond.min().item(), cond.median().item(), cond.max().item()]
            label = "random N(0, 0.02), Whisper large-v3 shapes" if name == "random" else name
            print(f"  {label:<44} {pair}: {' / '.join(f'{v:.1f}' for v in q)} ({len(cond)} heads)")


def time_baseline(shapes, device, head_fn, heads_per_shape: int) -> dict:
    """A per-head baseline timed on ``heads_per_shape`` heads of each distinct shape, extrapolated."""
    gen = torch.Generator(device=device).manual_seed(1)
    counts = Counter((tuple(sa), tuple(sb)) for sa, sb in shapes)
    total, errors, timed_heads = 0.0, [], 0
    for (sa, sb), n_modules in counts.items():
        n = min(heads_per_shape, sa[0])
        a, b = random_factors((n, *sa[1:]), (n, *sb[1:]), device, gen)
        per_head = sum(timed(lambda: head_fn(a[h], b[h]), device, repeats=1, warmup=int(h == 0)) for h in range(n)) / n
        total += per_head * sa[0] * n_modules  # every head of every module of this shape
        errors += [rel_error(*head_fn(a[h], b[h]), a[h], b[h]) for h in range(n)]
        timed_heads += n
    return {"time": total, "max_error": max(errors), "timed_heads": timed_heads, "shapes": len(counts)}


def run_model(name: str, device: torch.device, args: argparse.Namespace) -> None:
    shapes = pair_shapes(name)
    heads = sum(sa[0] for sa, _ in shapes)
    print(f"\n== {name}: {len(shapes) // 2} attention modules, {heads} head pairs (Q-K and V-O)")
    res = time_engine_and_floor(shapes, device, args.repeats, args.check_heads)
    print(f"  attention factors            {gib(res['bytes'])}")
    print(
        f"  engine (orthogonalize)       {res['engine']:9.2f} s   ({gib(res['bytes'])} / "
        f"{res['engine']:.2f} s = {res['bytes'] / res['engine'] / 2**30:.2f} GiB/s)"
    )
    print(
        f"  GEMM floor (read + 1 GEMM)   {res['floor']:9.2f} s   engine / floor = {res['engine'] / res['floor']:.2f}x"
        "   (target <= 3x)"
    )
    for label, fn, n, target in (
        ("full-SVD reference", reference_head, args.reference_heads, 100),
        ("svd_lowrank loop", lowrank_head, args.lowrank_heads, 10),
    ):
        if n <= 0:
            continue
        base = time_baseline(shapes, device, fn, n)
        print(
            f"  {label:<28} {base['time']:9.1f} s   engine is {base['time'] / res['engine']:.0f}x faster "
            f"(target >= {target}x); extrapolated from {base['timed_heads']} timed heads "
            f"({base['shapes']} shapes) to all {heads}; max rel error {base['max_error']:.1e}"
        )
    print(f"  engine max rel reconstruction error {res['max_error']:.1e} (float64 check of {res['checked']} heads)")
    if args.breakdown:
        breakdown(shapes, device, args.repeats)
    if args.decompose and name in ("gpt2-xl", "whisper-large-v3"):
        time_decompose(name, device)


def time_decompose(name: str, device: torch.device) -> None:
    """``clover_core.decompose`` on a real-structured model (random weights), factor extraction included;
    then the rank-major factors the slider reads: written directly, against decompose + conversion."""
    import clover_core as cc

    model = build_model(name, device)
    params = sum(p.numel() for p in model.parameters())
    seconds = timed(lambda: cc.decompose(model), device, repeats=1, warmup=0)
    print(f"  decompose() on the full {name} model ({params / 1e9:.2f}B parameters): {seconds:.2f} s")

    def converted() -> None:
        cc.decompose(model).use_rank_major()

    def direct_once() -> None:
        cc.decompose(model, rank_major=True)

    # Alternated, best of two each: a first touch of memory this process never used costs more than
    # reuse (on a VM especially), so neither side is timed only on fresh memory.
    direct = timed(direct_once, device, repeats=1, warmup=0)
    peak = peak_rss_bytes()  # the high-water mark so far: model + one decomposition (CPU)
    two_steps = timed(converted, device, repeats=1, warmup=0)
    extra = f"; the conversion raised peak RSS by {gib(peak_rss_bytes() - peak)}" if device.type == "cpu" else ""
    direct = min(direct, timed(direct_once, device, repeats=1, warmup=0))
    two_steps = min(two_steps, timed(converted, device, repeats=1, warmup=0))
    print(
        f"  rank-major factors (Slider, share_weights): decompose(rank_major=True) {direct:.2f} s vs "
        f"decompose() + use_rank_major() {two_steps:.2f} s = {two_steps / direct:.2f}x faster{extra}"
    )
    if device.type == "cpu":
        user, system = cpu_split(direct_once)
        print(
            f"  decompose(rank_major=True) CPU time: user {user:.2f} s + system {system:.2f} s "
            "(system: the kernel faulting in the factors' new memory)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(parser)
    parser.add_argument(
        "--models",
        nargs="*",
        default=list(SHAPE_MODELS),
        choices=SHAPE_MODELS,
        help="model shapes to time (none: only --conditioning)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="engine / floor runs per module (best kept)")
    parser.add_argument(
        "--reference-heads",
        type=int,
        default=2,
        help="heads per distinct shape timed for the full-SVD reference (0: skip)",
    )
    parser.add_argument(
        "--lowrank-heads", type=int, default=4, help="heads per distinct shape timed for the svd_lowrank loop (0: skip)"
    )
    parser.add_argument("--check-heads", type=int, default=2, help="heads per module checked in float64")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the engine's parts (Grams, eigensolve, other small algebra, rotation) "
        "per distinct module shape, as multiples of the floor",
    )
    parser.add_argument(
        "--conditioning",
        nargs="*",
        metavar="MODEL",
        help="print each head's eigenproblem conditioning for these offline models (default: "
        "random weights, smollm2-135m, gpt2-shakespeare, whisper-tiny.en, whisper-base)",
    )
    parser.add_argument(
        "--no-decompose",
        dest="decompose",
        action="store_false",
        help="skip decompose() on the full model (needs ~2x the model's size in memory)",
    )
    args = parser.parse_args(argv)
    device = setup_device(args)
    torch.manual_seed(0)
    with torch.no_grad():
        for name in args.models:
            run_model(name, device, args)
        if args.conditioning is not None:
            conditioning(
                args.conditioning or ["random", "smollm2-135m", "gpt2-shakespeare", "whisper-tiny.en", "whisper-base"]
            )


if __name__ == "__main__":
    main()
