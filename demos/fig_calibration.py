"""Calibrated (data-aware) against data-free scores: the 2x2 of {data-free, calibrated} x {vanilla,
CLOVER} against the pruning ratio, uniform mode, with the calibration data never the evaluation data.

    python demos/fig_calibration.py                              # smollm2-135m, V-O, WikiText-2
    python demos/fig_calibration.py --model whisper-tiny.en      # Q-K, V-O and both; English clips
    python demos/fig_calibration.py --model gpt2-shakespeare     # Q-K and V-O, WikiText-2

Language models calibrate on the bundled Paradise Lost and are measured on WikiText-2 test (and, in
the calibration's domain, on Paradise Lost tokens the calibration never saw); Whisper
calibrates on the bundled non-English clips (its own greedy transcripts as decoder inputs) and is
measured on the English clips with the protocol of demos/fig_whisper.py. The times of calibration
and of both decompositions are recorded, and the cost of calibrating printed as a multiple of the
data-free decomposition.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from fig_whisper import reference_tensors
from sweep import cc, metrics, pick_device, ratio_figure, sweep, write

from clover_core.audio import bundled_clips, calibration_clips, speech_batches, transcribe
from clover_core.data import calibration_text, wikitext_ids
from clover_core.metrics import teacher_forced_loss, word_error_rate

SCORES = ("data-free", "calibrated")
METHODS = ("vanilla", "clover")
DASH = {"data-free": "dash", "calibrated": "solid"}
PAIR = {"qk": "Q-K", "vo": "V-O", "both": "Q-K and V-O"}


@dataclass(frozen=True)
class Setup:
    """One model's defaults: ratios, targets, and (language models) the window of evaluation and calibration."""

    ratios: str
    targets: tuple[str, ...]
    window: int = 0


SETUPS = {
    "smollm2-135m": Setup("0,0.125,0.25,0.5", ("vo",), window=512),
    "whisper-tiny.en": Setup("0,0.125,0.25,0.5", ("qk", "vo", "both")),
    "gpt2-shakespeare": Setup("0,0.25,0.5,0.75", ("qk", "vo"), window=256),
}


@dataclass
class Task:
    """How a model is measured and calibrated, and what the record says about both."""

    evaluate: Callable[[torch.nn.Module], dict]
    batches: list[dict]
    batches_s: float  # seconds to make the calibration batches (tokenizing; Whisper's transcripts)
    source: str  # what calibrated, for the statistics' record
    panels: list[tuple[str, str]]
    meta: dict


def language_task(bundle, setup: Setup, args) -> Task:
    """WikiText-2 test perplexity, and (in the calibration's domain) perplexity on Paradise Lost tokens
    the calibration never saw; Paradise Lost calibration in windows of the evaluation's length."""
    window, stride = setup.window, setup.window // 2
    text, name = calibration_text("default")
    batches, batches_s = timed(cc.text_batches, bundle.processor, text, tokens=args.calibration_tokens, length=window)
    calibrated = sum(b["input_ids"].numel() for b in batches)
    start = 2 * calibrated  # a gap after the calibration tokens: no token is both calibrated on and evaluated
    poem = bundle.processor(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    data = {
        "wikitext2": wikitext_ids(bundle.processor, args.tokens),
        "heldout_paradise_lost": poem[start:][: args.tokens],
    }

    def evaluate(m):
        return {
            f"ppl_{k}": metrics.perplexity(m, ids, window=window, stride=stride, progress=False)
            for k, ids in data.items()
        }

    meta = {
        "calibrated_on": {"data": name, "tokens": calibrated, "length": window},
        "evaluated_on": {"data": "WikiText-2 raw test", "tokens": int(data["wikitext2"].numel())},
        "also_evaluated_on": {
            "data": f"{name}, tokens the calibration never saw (the calibration's domain)",
            "first_token": start,
            "tokens": int(data["heldout_paradise_lost"].numel()),
        },
        "protocol": f"sliding-window perplexity, window {window} / stride {stride}",
    }
    source = f"{name}, {calibrated} tokens"
    panels = [
        ("ppl_wikitext2", "perplexity, WikiText-2"),
        ("ppl_heldout_paradise_lost", "perplexity, held-out Paradise Lost"),
    ]
    return Task(evaluate, batches, batches_s, source, panels, meta)


def speech_task(bundle, setup: Setup, args) -> Task:
    """WER and teacher-forced loss on the English clips (demos/fig_whisper.py); the other clips calibrate."""
    model, processor = bundle.model, bundle.processor
    clips = bundled_clips()
    refs = reference_tensors(model, processor, clips)
    lang = {"language": "en", "task": "transcribe"} if model.config.vocab_size >= 51865 else {}

    def evaluate(m):
        hyps = [transcribe(m, processor, path, **lang) for path, _ in clips.values()]
        loss = sum(teacher_forced_loss(m, f, y, decoder_input_ids=x) for f, x, y in refs) / len(refs)
        return {"wer": word_error_rate([t for _, t in clips.values()], hyps), "loss": loss, "transcript_0": hyps[0]}

    paths = calibration_clips()
    batches, batches_s = timed(speech_batches, model, processor, paths)
    meta = {
        "calibrated_on": {
            "data": "pytest-audioeval non-English clips, the model's own greedy transcripts as decoder inputs",
            "clips": [f"{p.parent.name}/{p.name}" for p in paths],
            "decoder_tokens": sum(b["decoder_input_ids"].numel() for b in batches),
        },
        "evaluated_on": {"data": "pytest-audioeval English clips", "clips": {k: t for k, (_, t) in clips.items()}},
        "protocol": "greedy decoding, word error rate; teacher-forced loss of the reference transcripts",
    }
    panels = [("wer", "word error rate"), ("loss", "teacher-forced loss (nats/token)")]
    source = f"{len(paths)} non-English pytest-audioeval clips"
    return Task(evaluate, batches, batches_s, source, panels, meta)


def timed(fn: Callable, *args, repeat: int = 1, **kwargs):
    """``fn(*args, **kwargs)`` and the fewest seconds it took over ``repeat`` runs (the least disturbed)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return out, best


def unpruned_rows(model: torch.nn.Module, evaluate: Callable, targets: tuple[str, ...], label: str) -> list[dict]:
    """The ratio-0 row of every (scores, target, method): the unpruned model, measured once (pruning
    at ratio 0 reproduces it exactly, with either scores), in the columns :func:`sweep` writes."""
    size = {"parameters": metrics.parameter_count(model), "kv_bytes_per_token": metrics.kv_cache_bytes_per_token(model)}
    measured = evaluate(model)
    print(f"[unpruned] {measured}", flush=True)
    return [
        {"model": label, "target": t, "method": m, "mode": "uniform", "scores": s, "ratio": 0.0, **size, **measured}
        for s in SCORES
        for t in targets
        for m in METHODS
    ]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", choices=sorted(SETUPS))
    p.add_argument("--ratios", default=None, help="comma-separated shares removed (default: the model's)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens evaluated per text (language models)")
    p.add_argument("--calibration-tokens", dest="calibration_tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.add_argument("--repeat", type=int, default=3, help="runs of each timed step; the fastest is recorded")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    given = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "model" and v != p.get_default(k)]
    args.command = " ".join(["python demos/fig_calibration.py --model", args.model, *given])
    return args


def measure(bundle, task: Task, setup: Setup, ratios: list[float], repeat: int) -> tuple[list[dict], dict]:
    """The rows of the 2x2 at every ratio, and the seconds of the data-free decomposition, the
    calibration and the calibrated decomposition (each the fastest of ``repeat`` runs)."""
    rows = unpruned_rows(bundle.model, task.evaluate, setup.targets, bundle.name) if 0 in ratios else []
    sweeping = {"ratios": [r for r in ratios if r > 0], "targets": setup.targets, "mode": "uniform"}
    sweeping["label"] = bundle.name
    dec, free_s = timed(cc.decompose, bundle.model, repeat=repeat)
    rows += sweep(dec, task.evaluate, **sweeping, extra={"scores": "data-free"})
    del dec
    stats, calibrate_s = timed(cc.calibrate, bundle.model, task.batches, source=task.source, repeat=repeat)
    dec, calibrated_s = timed(cc.decompose, bundle.model, calibration=stats, repeat=repeat)
    rows += sweep(dec, task.evaluate, **sweeping, extra={"scores": "calibrated"})
    rows.sort(key=lambda r: (SCORES.index(r["scores"]), setup.targets.index(r["target"]), r["ratio"]))
    seconds = {
        "calibration_batches": round(task.batches_s, 3),
        "calibrate": round(calibrate_s, 3),
        "decompose_data_free": round(free_s, 3),
        "decompose_calibrated": round(calibrated_s, 3),
    }
    return rows, seconds


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    setup = SETUPS[args.model]
    device = pick_device(args.device)
    bundle = cc.load_model(args.model)
    bundle.model.to(device)
    task = (speech_task if args.model.startswith("whisper") else language_task)(bundle, setup, args)
    ratios = [float(r) for r in (args.ratios or setup.ratios).split(",")]
    rows, seconds = measure(bundle, task, setup, ratios, args.repeat)

    cost = (seconds["calibrate"] + seconds["decompose_calibrated"]) / seconds["decompose_data_free"]
    print(
        f"calibration {seconds['calibrate']:.1f}s + calibrated decomposition {seconds['decompose_calibrated']:.1f}s"
        f" = {cost:.1f}x the data-free decomposition ({seconds['decompose_data_free']:.2f}s); making the "
        f"calibration batches took {seconds['calibration_batches']:.1f}s"
    )
    meta = {
        "model": args.model,
        "device": str(device),
        "threads": args.threads,
        "mode": "uniform",
        "ratio_0": "the unpruned model, measured once",
        **task.meta,
        "command": args.command,
        "seconds_fastest_of": args.repeat,
        "seconds": seconds,
        "cost_ratio": round(cost, 3),
    }
    title = f"{args.model}: data-free (dashed) vs calibrated (solid) scores, uniform pruning"
    fig = ratio_figure(rows, task.panels, title, log_y="ppl_wikitext2" in rows[0], dashes=DASH)
    write(f"calibration_{args.model}", rows, fig, meta)


if __name__ == "__main__":
    main()
