"""The command line: ``python -m clover_core {spectra,prune,demo} --help``.

Results go to stdout (that is the command line's interface); errors are one line on stderr and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from . import metrics
from .architectures import kind_of
from .audio import audio_files, calibration_clips, speech_batches
from .calibrate import MIN_TOKENS, CalibrationStats, calibrate, norm_statistics, text_batches
from .data import calibration_text, wikitext_ids
from .decompose import decompose, spectra
from .io import checkpoint
from .io.stream import stream_prune, stream_spectra, streamable
from .io.weights import pipeline_component
from .models import load_model
from .prune import PruneConfig, prune
from .zoo import EMBEDDED

DEFAULT_MODEL = "gpt2-tiny-random"
CALIBRATION_TOKENS = 4096  # 8 windows of 512: enough for a 135M model
DEMO_WINDOW = 512  # demo perplexity: windows of this many tokens (or the model's positions), half overlapping
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
USER_ERRORS = (ValueError, TypeError, NotImplementedError, ModuleNotFoundError, OSError)  # OSError: a full disk too


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded offline name ({', '.join(EMBEDDED)}), a local model folder, or a "
        f"Hugging Face hub id such as openai-community/gpt2-xl (default: {DEFAULT_MODEL})",
    )


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default="qk",
        choices=["qk", "vo", "both"],
        help="which pair of each head to prune: Q-K (shrinks keys), V-O (shrinks values) or both",
    )
    p.add_argument(
        "--method",
        default="clover",
        choices=["clover", "vanilla"],
        help="clover: drop the weakest singular directions; vanilla: drop original head dims",
    )
    p.add_argument(
        "--mode",
        default="uniform",
        choices=["uniform", "global", "threshold"],
        help="uniform: every head keeps round(head_dim*(1-ratio)); global: one threshold at the "
        "ratio-quantile of all heads' scores; threshold: drop singular values <= --threshold",
    )
    p.add_argument("--ratio", type=float, default=None, help="fraction of directions removed, in [0, 1)")
    p.add_argument(
        "--allocation",
        default="raw",
        choices=["raw", "normalized"],
        help="mode global: rank the scores as they are (raw, the paper) or each layer's relative to its own "
        "root-mean-square score (normalized: layers of other scales compared like with like)",
    )
    p.add_argument("--threshold", type=float, default=None, help="absolute singular-value threshold (mode threshold)")
    p.add_argument(
        "--calibration",
        default=None,
        metavar="FILE|default",
        help="score directions by the activations on data instead of by the weights alone: a UTF-8 text file "
        "(language models) or an audio file or folder (Whisper), or 'default' (the bundled Paradise Lost, or the "
        "bundled non-English clips: never the data the figures are measured on), or 'norms' (no data: the norms' "
        "gains folded into the scores); the model is loaded into memory",
    )
    p.add_argument(
        "--calibration-tokens", type=int, default=CALIBRATION_TOKENS, help="tokens of the calibration text to run"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per job."""
    prog = Path(sys.argv[0]).name
    prog = "python -m clover_core" if prog in ("__main__.py", "-c", "") else prog  # or the installed `clover`
    parser = argparse.ArgumentParser(prog=prog, description="CLOVER attention-head pruning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser(
        "spectra",
        help="write every head's Q-K and V-O singular values as JSON; a model folder "
        "(or a hub id cached locally) is read one attention module at a time, as prune streams it",
    )
    _model_arg(sp)
    sp.add_argument("--out", required=True, help="JSON file to write")
    pp = sub.add_parser(
        "prune",
        help="prune a model and save it as a safetensors checkpoint folder; a model "
        "folder of safetensors weights (sharded or not; a diffusers pipeline: its unet/), or a hub "
        "id whose snapshot is in the local cache, is streamed module by module, never loaded whole",
    )
    _model_arg(pp)
    _prune_args(pp)
    pp.add_argument("--out", required=True, help="checkpoint folder to write (atomically)")
    pp.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="dtype of the saved weights (default: the model's)"
    )
    dp = sub.add_parser("demo", help="spectra, then CLOVER and vanilla pruning, then a before/after comparison")
    _model_arg(dp)
    _prune_args(dp)
    dp.add_argument("--tokens", type=int, default=2048, help="WikiText-2 test tokens scored for perplexity")
    dp.add_argument("--out", default=None, help="also save the CLOVER-pruned checkpoint here")
    return parser


def cmd_spectra(args: argparse.Namespace) -> None:
    source = streamable(args.model)  # larger than memory, maybe: one attention module at a time
    spec = stream_spectra(source, progress=True) if source is not None else spectra(load_model(args.model).model)
    Path(args.out).write_text(json.dumps({n: {p: s.tolist() for p, s in d.items()} for n, d in spec.items()}))
    print(f"wrote the spectra of {len(spec)} attention modules to {args.out}")


def _check_prune_args(args: argparse.Namespace) -> PruneConfig:
    """Validate the pruning request before any model is loaded, so bad input fails fast."""
    if args.calibration is not None:
        if (
            args.calibration not in ("default", "norms") and not Path(args.calibration).exists()
        ):  # fails before any model loads
            raise ValueError(
                f"--calibration {args.calibration!r} does not exist; pass a text file (language "
                "models), an audio file or folder (Whisper), or 'default'"
            )
        if args.calibration_tokens < MIN_TOKENS:
            raise ValueError(f"--calibration-tokens={args.calibration_tokens} must be at least {MIN_TOKENS}")
    return PruneConfig(
        ratio=args.ratio,
        target=args.target,
        method=args.method,
        mode=args.mode,
        threshold=args.threshold,
        allocation=args.allocation,
    )


def _calibration(args: argparse.Namespace, bundle) -> CalibrationStats | None:
    """The statistics ``--calibration`` asks for (None: data-free), gathered on ``bundle``'s model: a
    text for a language model, speech for a Whisper model."""
    if args.calibration is None:
        return None
    if args.calibration == "norms":
        print("folding the norms' gains into the scores (no data)")
        return norm_statistics(bundle.model)
    kind = kind_of(bundle.model, bundle.processor)
    if kind == "speech":
        clips = calibration_clips() if args.calibration == "default" else audio_files(args.calibration)
        name = "the bundled non-English clips" if args.calibration == "default" else Path(args.calibration).name
        print(f"calibrating on {len(clips)} clips of {name}")
        batches = speech_batches(bundle.model, bundle.processor, clips)
        return calibrate(bundle.model, batches, source=f"{name}, {len(clips)} clips", progress=True)
    if kind != "lm":
        raise ValueError(
            f"--calibration takes a text (language models) or speech (Whisper); {args.model!r} is a {kind} model: "
            "calibrate it from Python with clover_core.calibrate(model, batches) on its own inputs"
        )
    text, name = calibration_text(args.calibration)
    length = min(DEMO_WINDOW, metrics.position_limit(bundle.model) or DEMO_WINDOW)
    batches = text_batches(bundle.processor, text, tokens=args.calibration_tokens, length=length)
    tokens = sum(b["input_ids"].numel() for b in batches)
    print(f"calibrating on {tokens:,} tokens of {name}")
    return calibrate(bundle.model, batches, source=f"{name}, {tokens} tokens", progress=True)


def cmd_prune(args: argparse.Namespace) -> None:
    config = _check_prune_args(args)
    source = streamable(args.model)  # larger than memory, maybe
    if source is not None and args.calibration is not None:
        print("calibration runs the whole model: it is loaded into memory, not streamed")
        source = None
    if source is not None:
        hub_id = None if Path(args.model).is_dir() else args.model  # streamed from the local cache's snapshot
        out, pruned = stream_prune(
            source, args.out, config, dtype=DTYPES[args.dtype] if args.dtype else None, base_model=hub_id, progress=True
        )
        print(_size_line("pruned", pruned))
        if pipeline_component(source):
            print(
                f"saved the pipeline's UNet to {out} (streamed module by module; its other components are "
                "unchanged: load the pipeline and pass it unet=, as the folder's README.md shows)"
            )
        else:
            print(f"saved to {out} (streamed module by module)")
        return
    bundle = load_model(args.model)
    stats = _calibration(args, bundle)
    pruned = prune(
        bundle.model,
        ratio=args.ratio,
        target=args.target,
        method=args.method,
        mode=args.mode,
        threshold=args.threshold,
        calibration=stats,
        allocation=args.allocation,
    )
    out = checkpoint.save_pruned(
        pruned, args.out, processor=bundle.processor, dtype=DTYPES[args.dtype] if args.dtype else None
    )
    print(_size_line("pruned", pruned))
    print(f"saved to {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    if args.ratio is None and args.mode != "threshold":
        args.ratio = 0.5
    _check_prune_args(args)
    bundle = load_model(args.model)
    kind = kind_of(bundle.model, bundle.processor)
    if kind != "lm":
        raise ValueError(
            f"model={args.model!r} is a {kind} model; demo scores WikiText-2 perplexity, which needs a "
            "language model: use spectra or prune for it"
        )
    stats = _calibration(args, bundle)
    start = time.perf_counter()
    dec = decompose(bundle.model, progress=True, calibration=stats)
    print(f"decomposed {len(dec.modules)} attention modules in {time.perf_counter() - start:.2f}s")
    for name, pairs in list(spectra(dec).items())[:2]:
        for pair, s in pairs.items():
            print(f"  {name} {pair}: head 0 singular values {_fmt(s[0][:6])} ...")
    ids = wikitext_ids(bundle.processor, args.tokens)
    rows = [("original", bundle.model)]
    for method in ("vanilla", "clover"):
        rows.append(
            (
                method,
                prune(
                    dec,
                    ratio=args.ratio,
                    target=args.target,
                    method=method,
                    mode=args.mode,
                    threshold=args.threshold,
                    allocation=args.allocation,
                ),
            )
        )
    window = min(DEMO_WINDOW, metrics.position_limit(bundle.model) or DEMO_WINDOW)
    print(
        f"\n{args.target} pruning, mode {args.mode}, ratio {args.ratio}, threshold {args.threshold}; "
        f"perplexity on {ids.numel()} WikiText-2 test tokens (windows of {window}, stride {window // 2}); "
        + (f"scores calibrated on {stats.source}" if stats is not None else "data-free scores (the weights alone)")
    )
    for label, model in rows:
        ppl = metrics.perplexity(model, ids, window=window, stride=window // 2, progress=False)
        print(f"{_size_line(label, model)}  perplexity {ppl:10.2f}")
    if args.out:
        print(f"saved to {checkpoint.save_pruned(rows[-1][1], args.out, processor=bundle.processor)}")


def _size_line(label: str, model: torch.nn.Module) -> str:
    params, kv = metrics.parameter_count(model), metrics.kv_cache_bytes_per_token(model)
    cache = f", {kv:>9,} KV-cache bytes/token" if kv else ""  # a UNet keeps no cache
    return f"{label:>9}: {params:>13,} parameters{cache}"


def _fmt(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values.tolist()) + "]"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        {"spectra": cmd_spectra, "prune": cmd_prune, "demo": cmd_demo}[args.command](args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
