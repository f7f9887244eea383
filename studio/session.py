"""One user's pruning setting: the vanilla and CLOVER models of the same size, pruned from the cached
decomposition, with their sizes and measured quality (no UI code here)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from clover_core import metrics
from clover_core.prune import Mode, PruneConfig, Target, prune

from .cache import Loaded, Progress, report
from .calibration import SCORES, Scores, decomposition
from .outputs import IMAGE_PROMPT, make_image, transcribe_clip

VARIANTS = ("original", "vanilla", "clover")
LM_EVAL_TOKENS = 512  # a fixed slice of WikiText-2 test: quick on a CPU, stable enough to rank models
IMAGE_STEPS = 8  # the quality image; the compare tab lets the user choose


@dataclass(frozen=True)
class Setting:
    """One pruning request of the app; validated like :class:`~clover_core.prune.PruneConfig`."""

    model: str
    ratio: float
    target: Target
    mode: Mode
    scores: Scores = "data-free"

    def __post_init__(self) -> None:
        if self.mode == "threshold":
            raise ValueError("mode='threshold' is not offered here; use 'uniform' or 'global' with a ratio")
        if self.scores not in SCORES:
            raise ValueError(f"scores={self.scores!r} is not offered; choose one of {', '.join(SCORES)}")
        PruneConfig(ratio=self.ratio, target=self.target, mode=self.mode)


@dataclass
class PrunedPair:
    """The vanilla and CLOVER models of one setting, keeping the same number of directions (the same
    sizes in uniform mode; in global mode each method picks its own heads); ``quality`` is filled on demand."""

    setting: Setting
    loaded: Loaded
    vanilla: nn.Module
    clover: nn.Module
    quality: dict[str, dict[str, float]] | None = None

    def models(self) -> dict[str, nn.Module]:
        """``{"original", "vanilla", "clover"}`` -> model."""
        return {"original": self.loaded.model, "vanilla": self.vanilla, "clover": self.clover}


def pruned_pair(
    loaded: Loaded, setting: Setting, current: PrunedPair | None = None, progress: Progress | None = None
) -> PrunedPair:
    """``current`` when it already holds this setting, else both models pruned from the cached decomposition
    (the calibrated one, made once per model, for ``scores="calibrated"``: both methods use it).

    Raises:
        ValueError: a setting the model does not support (Q-K of a rotary model), or a name mismatch.
    """
    if setting.model != loaded.name:
        raise ValueError(f"setting.model={setting.model!r} does not match the loaded model {loaded.name!r}")
    if current is not None and current.setting == setting:
        return current
    dec = decomposition(loaded, setting.scores, progress)
    models = {}
    for i, method in enumerate(("vanilla", "clover")):
        report(progress, 0.5 * i, f"pruning {method}: {setting.target}, {setting.mode}, ratio {setting.ratio:g}")
        models[method] = prune(
            dec, ratio=setting.ratio, target=setting.target, method=method, mode=setting.mode, share_weights=True
        )  # read-only here: no copy of the model
    return PrunedPair(setting, loaded, models["vanilla"], models["clover"])


def sizes(pair: PrunedPair) -> dict[str, dict[str, int]]:
    """``{variant: {"parameters", "kv_bytes_per_token"}}`` (true ranks, padding excluded)."""
    return {
        variant: {
            "parameters": metrics.parameter_count(model),
            "kv_bytes_per_token": metrics.kv_cache_bytes_per_token(model),
        }
        for variant, model in pair.models().items()
    }


def measure_quality(pair: PrunedPair, progress: Progress | None = None) -> dict[str, dict[str, float]]:
    """Quality of the three variants, computed once per pair (the original's once per model).

    Language models: perplexity on the first ``LM_EVAL_TOKENS`` tokens of WikiText-2 test. Whisper:
    word error rate on the bundled English clips. Diffusion: PSNR / SSIM of the image of
    ``IMAGE_PROMPT`` against the unpruned model's (same seed and scheduler).
    """
    if pair.quality is None:
        loaded = pair.loaded
        measure = {"lm": _perplexity, "speech": _word_error_rate, "diffusion": _image_similarity}[loaded.kind]
        with loaded.lock:
            if "quality" not in loaded.baseline:
                report(progress, 0.0, "measuring the original model (once)")
                loaded.baseline["quality"] = measure(loaded, loaded.model)
        quality = {"original": loaded.baseline["quality"]}
        for i, variant in enumerate(("vanilla", "clover")):
            report(progress, 0.3 + 0.35 * i, f"measuring the {variant}-pruned model")
            quality[variant] = measure(loaded, getattr(pair, variant))
        pair.quality = quality
    return pair.quality


def _perplexity(loaded: Loaded, model: nn.Module) -> dict[str, float]:
    from clover_core.data import wikitext_ids

    if "eval_ids" not in loaded.baseline:
        loaded.baseline["eval_ids"] = wikitext_ids(loaded.processor, LM_EVAL_TOKENS)
    ids = loaded.baseline["eval_ids"]
    window = min(ids.numel(), getattr(model.config, "n_positions", None) or ids.numel())
    return {"perplexity": metrics.perplexity(model, ids, window=window, stride=window, progress=False)}


def _word_error_rate(loaded: Loaded, model: nn.Module) -> dict[str, float]:
    from clover_core.audio import bundled_clips

    clips = bundled_clips()
    hyps = [transcribe_clip(model, loaded.processor, str(wav), language="en") for wav, _ in clips.values()]
    return {"wer": metrics.word_error_rate([ref for _, ref in clips.values()], hyps)}


def _image_similarity(loaded: Loaded, model: nn.Module) -> dict[str, float]:
    if "image" not in loaded.baseline:
        loaded.baseline["image"] = make_image(loaded.processor, loaded.model, IMAGE_PROMPT, 0, IMAGE_STEPS)
    reference = loaded.baseline["image"]
    image = reference if model is loaded.model else make_image(loaded.processor, model, IMAGE_PROMPT, 0, IMAGE_STEPS)
    return {"psnr_db": metrics.psnr(reference, image), "ssim": metrics.ssim(reference, image)}
