"""The app's calibrated scores: each model calibrated once, on bundled data that is never what the
quality figures are measured on, and decomposed again with those statistics (no UI code here).

- language models: the bundled *Paradise Lost* (quality: WikiText-2 test);
- Whisper: the bundled clips in languages other than English (quality: the English clips);
- a diffusion pipeline: its own generations of two prompts that are not the quality prompt.
"""

from __future__ import annotations

from typing import Literal

from clover_core.calibrate import CalibrationStats, calibrate, calibrate_while, text_batches
from clover_core.decompose import Decomposition, decompose
from clover_core.metrics import position_limit

from .cache import Loaded, Progress, nbytes, report
from .outputs import make_image

Scores = Literal["data-free", "calibrated"]
SCORES: tuple[Scores, ...] = ("data-free", "calibrated")
TEXT_TOKENS = 2048  # Paradise Lost tokens a language model runs on: a few seconds on a CPU for SmolLM2
PROMPTS = ("a watercolor painting of a lighthouse at dusk", "a close-up photograph of a red fox in the snow")
PROMPT_STEPS = 4


def decomposition(loaded: Loaded, scores: Scores, progress: Progress | None = None) -> Decomposition:
    """``loaded``'s decomposition for these scores: the data-free one, or the calibrated one (made on
    first use, once per model, and counted in the model's memory)."""
    if scores not in SCORES:
        raise ValueError(f"scores={scores!r} is not offered; choose one of {', '.join(SCORES)}")
    if scores == "data-free":
        return loaded.dec
    with loaded.calibration_lock:
        if loaded.calibrated is None:
            report(progress, 0.05, f"calibrating {loaded.name} on {describe(loaded)} (once per model)")
            stats = _statistics(loaded)
            report(progress, 0.35, f"decomposing {loaded.name} with its calibration (once per model)")
            dec = decompose(loaded.model, rank_major=True, calibration=stats)
            loaded.nbytes += nbytes(
                *[t for md in dec.modules.values() for pd in md.pairs.values() for t in (pd.a, pd.b)]
            )
            loaded.calibrated = dec
    return loaded.calibrated


def describe(loaded: Loaded) -> str:
    """The data that calibrates ``loaded``, in words."""
    return {
        "lm": f"{TEXT_TOKENS:,} tokens of Paradise Lost",
        "speech": "the bundled speech in languages other than English",
        "diffusion": f"its own images of {len(PROMPTS)} other prompts",
    }[loaded.kind]


def _statistics(loaded: Loaded) -> CalibrationStats:
    model, processor, source = loaded.model, loaded.processor, describe(loaded)
    if loaded.kind == "lm":
        from clover_core.data import calibration_text

        length = min(512, position_limit(model) or 512)
        batches = text_batches(processor, calibration_text("default")[0], tokens=TEXT_TOKENS, length=length)
        return calibrate(model, batches, source=source)
    if loaded.kind == "speech":
        from clover_core.audio import calibration_clips, speech_batches

        return calibrate(model, speech_batches(model, processor, calibration_clips()), source=source)

    def run() -> None:
        for seed, prompt in enumerate(PROMPTS):
            make_image(processor, model, prompt, seed, PROMPT_STEPS)

    return calibrate_while(model, run, source=source)
