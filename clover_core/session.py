"""What the web app keeps between requests, engine side (no UI code here).

- :class:`ModelCache`: loaded models shared read-only by every user, each decomposed once, kept in
  a least-recently-used cache under a memory budget.
- :class:`PrunedPair`: the vanilla and CLOVER models of one pruning setting (the same number of
  directions kept), with their sizes and measured quality; one per user session.
- Side-by-side outputs (text, transcripts, images) and zipped checkpoints in a folder that sweeps
  away files older than an hour.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from . import metrics
from .checkpoint import save_pruned
from .decompose import Decomposition, decompose
from .models import EMBEDDED, load_model
from .prune import Mode, PruneConfig, Target, prune

log = logging.getLogger(__name__)

Kind = Literal["lm", "speech", "diffusion"]
Loader = Callable[[], tuple[nn.Module, object]]
Progress = Callable[[float, str], None]
VARIANTS = ("original", "vanilla", "clover")

LM_EVAL_TOKENS = 512  # a fixed slice of WikiText-2 test: quick on a CPU, stable enough to rank models
MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 128
MAX_AUDIO_SECONDS = 30.0  # one Whisper window
MAX_AUDIO_BYTES = 10 * 2**20
MAX_TRANSCRIPT_TOKENS = 128  # a heavily pruned model may babble; this bounds the time it takes
IMAGE_PROMPT = "a photograph of an astronaut riding a horse"
IMAGE_STEPS = 8  # the quality image; the compare tab lets the user choose
MAX_IMAGE_STEPS = 50


@dataclass
class Loaded:
    """A model loaded once and shared read-only: never modified; pruned models share its weights outside
    the attention modules, and their attention weights are views of ``dec`` (its rotated factors and the
    rank-major copies of the original ones, made at load time) wherever no copy is needed.

    ``baseline`` caches the original model's measurements (filled under ``lock``).
    """

    name: str
    model: nn.Module
    processor: object
    kind: Kind
    dec: Decomposition
    nbytes: int
    baseline: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def model_kind(model: nn.Module, processor: object) -> Kind:
    """``"diffusion"`` (a diffusers model: the processor is its pipeline, or None for a UNet loaded on its
    own), ``"speech"`` (Whisper) or ``"lm"``."""
    from transformers import WhisperForConditionalGeneration

    diffusers = sys.modules.get("diffusers")  # not imported: the model cannot be one of its classes
    if getattr(processor, "unet", None) is model or (diffusers is not None and isinstance(model, diffusers.ModelMixin)):
        return "diffusion"
    return "speech" if isinstance(model, WhisperForConditionalGeneration) else "lm"


def nbytes(*objects: object) -> int:
    """Bytes held by tensors, by modules' parameters and buffers, and by every module of a pipeline."""
    total, seen = 0, set()
    for obj in objects:
        parts = [obj] if isinstance(obj, (nn.Module, torch.Tensor)) else list(getattr(obj, "components", {}).values())
        for part in parts:
            if isinstance(part, torch.Tensor):
                tensors = [part]
            elif isinstance(part, nn.Module):
                tensors = [*part.parameters(), *part.buffers()]
            else:
                continue
            for t in tensors:
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def _report(progress: Progress | None, fraction: float, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(fraction, message)


class ModelCache:
    """Loaded and decomposed models by name, least recently used evicted beyond ``budget_bytes``.

    Args:
        budget_bytes: memory for models and their decompositions; the newest model is kept even
            when it alone exceeds the budget.
        device: where models are moved after loading (the caller chooses, e.g. ``"cuda"``).
        loaders: extra names -> ``() -> (model, processor)``, tried before :func:`load_model`.
        allow_local: accept local folders; off for a public server, whose disk is not the users'.
    """

    def __init__(self, budget_bytes: int, *, device: str | torch.device = "cpu",
                 loaders: dict[str, Loader] | None = None, allow_local: bool = False):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes={budget_bytes} must be positive")
        self.budget_bytes, self.device, self.allow_local = budget_bytes, torch.device(device), allow_local
        self.loaders = dict(loaders or {})
        self._entries: OrderedDict[str, Loaded] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def names(self) -> list[str]:
        """Cached model names, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, name: str, progress: Progress | None = None) -> Loaded:
        """The cached model, loading and decomposing it on first use (one load per name at a time).

        Raises:
            ValueError: an unknown name, an unreachable hub id, or a local path when not allowed.
            ModuleNotFoundError: an offline model whose data package is missing.
            NotImplementedError: a model without attention CLOVER supports.
        """
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
                return self._entries[name]
            gate = self._loading.setdefault(name, threading.Lock())
        try:
            with gate:
                with self._lock:
                    if name in self._entries:
                        return self._entries[name]
                loaded = self._load(name, progress)
                with self._lock:
                    self._entries[name] = loaded
                    self._evict(keep=name)
        finally:
            with self._lock:  # one gate per name being loaded, not one per name ever typed
                if self._loading.get(name) is gate:
                    del self._loading[name]
        return loaded

    def _load(self, name: str, progress: Progress | None) -> Loaded:
        self._check_name(name)
        _report(progress, 0.0, f"loading {name}")
        if name in self.loaders:
            model, processor = self.loaders[name]()
        else:
            bundle = load_model(name)
            model, processor = bundle.model, bundle.processor
        kind = model_kind(model, processor)
        if kind == "diffusion" and getattr(processor, "unet", None) is not model:
            raise ValueError(f"{name} is a diffusers {type(model).__name__} without its pipeline; the app draws "
                             "images, which needs the whole pipeline: load the pipeline's folder (the one with "
                             "model_index.json)")
        (processor if kind == "diffusion" else model).to(self.device)
        _report(progress, 0.3, f"decomposing the attention of {name} (once per model)")
        # pruned models (share_weights) slice the factors: written rank-major from the start
        dec = decompose(model.eval(), progress=True, rank_major=True)
        originals = [t for name, md in dec.modules.items() for pair in md.pairs for t in dec.original(name, pair)]
        size = nbytes(processor if kind == "diffusion" else model) + nbytes(
            *[t for md in dec.modules.values() for pd in md.pairs.values() for t in (pd.a, pd.b)], *originals)
        log.info("loaded %s (%s, %.2f GB with its decomposition)", name, kind, size / 1e9)
        return Loaded(name, model, processor, kind, dec, size)

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"model={name!r} is empty; choose a model from the list or type a hub id")
        if name not in self.loaders and name not in EMBEDDED and not self.allow_local and Path(name).exists():
            raise ValueError(f"model={name!r} is a local path, and local models are disabled on this server; "
                             "use a hub id (owner/name) or an offline model")

    def _evict(self, keep: str) -> None:
        while len(self._entries) > 1 and sum(e.nbytes for e in self._entries.values()) > self.budget_bytes:
            name = next(n for n in self._entries if n != keep)
            del self._entries[name]
            log.info("evicted %s from the model cache (budget %.2f GB)", name, self.budget_bytes / 1e9)


@dataclass(frozen=True)
class Setting:
    """One pruning request of the app; validated like :class:`~clover_core.prune.PruneConfig`."""

    model: str
    ratio: float
    target: Target
    mode: Mode

    def __post_init__(self) -> None:
        if self.mode == "threshold":
            raise ValueError("mode='threshold' is not offered here; use 'uniform' or 'global' with a ratio")
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


def pruned_pair(loaded: Loaded, setting: Setting, current: PrunedPair | None = None,
                progress: Progress | None = None) -> PrunedPair:
    """``current`` when it already holds this setting, else both models pruned from the cached decomposition.

    Raises:
        ValueError: a setting the model does not support (Q-K of a rotary model), or a name mismatch.
    """
    if setting.model != loaded.name:
        raise ValueError(f"setting.model={setting.model!r} does not match the loaded model {loaded.name!r}")
    if current is not None and current.setting == setting:
        return current
    models = {}
    for i, method in enumerate(("vanilla", "clover")):
        _report(progress, 0.5 * i, f"pruning {method}: {setting.target}, {setting.mode}, ratio {setting.ratio:g}")
        models[method] = prune(loaded.dec, ratio=setting.ratio, target=setting.target, method=method,
                               mode=setting.mode, share_weights=True)  # read-only here: no copy of the model
    return PrunedPair(setting, loaded, models["vanilla"], models["clover"])


def sizes(pair: PrunedPair) -> dict[str, dict[str, int]]:
    """``{variant: {"parameters", "kv_bytes_per_token"}}`` (true ranks, padding excluded)."""
    return {variant: {"parameters": metrics.parameter_count(model),
                      "kv_bytes_per_token": metrics.kv_cache_bytes_per_token(model)}
            for variant, model in pair.models().items()}


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
                _report(progress, 0.0, "measuring the original model (once)")
                loaded.baseline["quality"] = measure(loaded, loaded.model)
        quality = {"original": loaded.baseline["quality"]}
        for i, variant in enumerate(("vanilla", "clover")):
            _report(progress, 0.3 + 0.35 * i, f"measuring the {variant}-pruned model")
            quality[variant] = measure(loaded, getattr(pair, variant))
        pair.quality = quality
    return pair.quality


def _perplexity(loaded: Loaded, model: nn.Module) -> dict[str, float]:
    from .data import wikitext_ids

    if "eval_ids" not in loaded.baseline:
        loaded.baseline["eval_ids"] = wikitext_ids(loaded.processor, LM_EVAL_TOKENS)
    ids = loaded.baseline["eval_ids"]
    window = min(ids.numel(), getattr(model.config, "n_positions", None) or ids.numel())
    return {"perplexity": metrics.perplexity(model, ids, window=window, stride=window, progress=False)}


def _word_error_rate(loaded: Loaded, model: nn.Module) -> dict[str, float]:
    from .audio import bundled_clips

    clips = bundled_clips()
    hyps = [transcribe_clip(model, loaded.processor, str(wav), language="en") for wav, _ in clips.values()]
    return {"wer": metrics.word_error_rate([ref for _, ref in clips.values()], hyps)}


def _image_similarity(loaded: Loaded, model: nn.Module) -> dict[str, float]:
    if "image" not in loaded.baseline:
        loaded.baseline["image"] = make_image(loaded.processor, loaded.model, IMAGE_PROMPT, 0, IMAGE_STEPS)
    reference = loaded.baseline["image"]
    image = reference if model is loaded.model else make_image(loaded.processor, model, IMAGE_PROMPT, 0, IMAGE_STEPS)
    return {"psnr_db": metrics.psnr(reference, image), "ssim": metrics.ssim(reference, image)}


# --------------------------------------------------------------------------- side-by-side outputs


@torch.no_grad()
def complete_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (the new text only).

    Raises:
        ValueError: an empty prompt, one over ``MAX_PROMPT_TOKENS`` tokens, or ``max_new_tokens``
            outside ``1..MAX_NEW_TOKENS``.
    """
    if not prompt or not prompt.strip():
        raise ValueError("prompt is empty; type a few words to continue")
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be between 1 and {MAX_NEW_TOKENS}")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] > MAX_PROMPT_TOKENS:
        raise ValueError(f"the prompt has {ids.shape[1]} tokens, over the cap of {MAX_PROMPT_TOKENS}; shorten it")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=False,
                         num_beams=1, max_new_tokens=int(max_new_tokens), pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def read_audio(path: str | os.PathLike) -> np.ndarray:
    """An uploaded or recorded clip as 16 kHz mono, within the caps (size, then duration); messages name
    the file, not the server folder it was uploaded to.

    Raises:
        ValueError: over ``MAX_AUDIO_BYTES`` or ``MAX_AUDIO_SECONDS``, not audio, or silent.
        FileNotFoundError: the file does not exist.
    """
    from .audio import is_silent, load_audio

    path = Path(path)
    size = path.stat().st_size
    if size > MAX_AUDIO_BYTES:
        raise ValueError(f"{path.name} is {size / 2**20:.1f} MB, over the cap of {MAX_AUDIO_BYTES / 2**20:g} MB; "
                         "trim it or compress it (FLAC, OGG, MP3)")
    try:
        samples = load_audio(str(path), max_seconds=MAX_AUDIO_SECONDS)
    except ValueError as e:
        raise ValueError(str(e).replace(str(path), path.name)) from None
    if is_silent(samples):
        raise ValueError(f"{path.name} is silent (no sample above -80 dBFS); record again, or upload a clip with "
                         "speech")
    return samples


def transcribe_clip(model: nn.Module, processor, audio, language: str | None = None) -> str:
    """Greedy transcript; ``language`` is passed only to multilingual models (English-only ones refuse it)."""
    from .audio import transcribe

    multilingual = getattr(model.generation_config, "is_multilingual", False)
    return transcribe(model, processor, audio, language=language if multilingual else None,
                      max_new_tokens=MAX_TRANSCRIPT_TOKENS)


@torch.no_grad()
def make_image(pipe, unet: nn.Module, prompt: str, seed: int, steps: int) -> torch.Tensor:
    """One image of ``pipe`` run with ``unet`` (same components, scheduler and seed), ``(3, H, W)`` in [0, 1].

    Raises:
        ValueError: an empty prompt or ``steps`` outside ``1..MAX_IMAGE_STEPS``.
    """
    from .random_models import generate_image, with_unet

    if not prompt or not prompt.strip():
        raise ValueError("prompt is empty; describe the image to generate")
    if not 1 <= int(steps) <= MAX_IMAGE_STEPS:
        raise ValueError(f"steps={steps} must be between 1 and {MAX_IMAGE_STEPS}")
    runner = pipe if unet is pipe.unet else with_unet(pipe, unet)
    return generate_image(runner, prompt, seed=int(seed), steps=int(steps))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A ``(3, H, W)`` image in [0, 1] as an ``(H, W, 3)`` uint8 array for display."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


# --------------------------------------------------------------------------- downloads


class ScratchFolder:
    """The app's own temporary folder; entries older than ``max_age_s`` are removed by :meth:`sweep`."""

    def __init__(self, root: str | os.PathLike | None = None, max_age_s: float = 3600.0):
        self.root = Path(root) if root is not None else Path(tempfile.gettempdir()) / "clover-studio"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_age_s = max_age_s

    def sweep(self) -> int:
        """Remove entries last modified more than ``max_age_s`` ago; returns how many."""
        cutoff, removed = time.time() - self.max_age_s, 0
        for entry in self.root.iterdir():
            try:
                if entry.lstat().st_mtime < cutoff:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                    removed += 1
            except FileNotFoundError:  # swept by another request at the same time
                continue
        return removed

    def start_sweeping(self, interval_s: float | None = None) -> threading.Event:
        """Sweep every ``interval_s`` seconds (default: a quarter of ``max_age_s``) in a daemon thread,
        so files go away on schedule even when nobody downloads; set the returned event to stop it."""
        interval = interval_s if interval_s is not None else self.max_age_s / 4
        if not interval > 0:
            raise ValueError(f"interval_s={interval_s!r} must be a positive number of seconds")
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.sweep()
                except OSError as e:  # a vanished or unreadable root: try again next time
                    log.warning("sweeping %s failed: %s", self.root, e)

        threading.Thread(target=loop, name="clover-scratch-sweeper", daemon=True).start()
        return stop

    def new_dir(self, prefix: str) -> Path:
        """A fresh, uniquely named folder inside the root."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))


def export_checkpoint(pair: PrunedPair, folder: str | os.PathLike) -> Path:
    """The CLOVER model saved with :func:`~clover_core.save_pruned` and zipped (stored: weights barely compress).

    Returns:
        ``folder/<model>-clover-<target>-<mode>-<ratio>.zip``; the archive holds one folder of that name.
    """
    s = pair.setting
    stem = f"{Path(s.model).name}-clover-{s.target}-{s.mode}-{s.ratio:g}"
    folder = Path(folder)
    processor = None if pair.loaded.kind == "diffusion" else pair.loaded.processor  # the UNet only
    saved = save_pruned(pair.clover, folder / stem, processor=processor)
    archive = folder / f"{stem}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(saved.rglob("*")):
            if path.is_file():
                zf.write(path, Path(stem) / path.relative_to(saved))
    shutil.rmtree(saved)
    return archive
