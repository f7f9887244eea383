"""Speech input for the Whisper models: audio files or arrays -> 16 kHz mono float32, the bundled
English clips with their reference transcripts, and greedy transcription."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .zoo.packages import package_dir

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # what Whisper's feature extractor expects
WINDOW_SECONDS = 30.0  # one Whisper window; longer audio is transcribed window by window
MAX_SECONDS = 20 * WINDOW_SECONDS
SILENCE = 1e-4  # peak amplitude below -80 dBFS counts as silence
CLIPS = ("counting", "hello_world", "quick_brown_fox")


def load_audio(path_or_array, sr: int | None = None, *, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Audio as 16 kHz mono float32: files are decoded, stereo is averaged, other rates are resampled.

    Args:
        path_or_array: a file soundfile can read (WAV, FLAC, OGG, MP3), an array at ``sr`` of shape
            ``(samples,)`` or ``(samples, channels)`` (integer PCM is scaled to [-1, 1]), or a
            ``(sr, array)`` pair as a Gradio ``Audio`` component gives it.
        sr: the sample rate of an array; leave it None for a file or a pair (they carry their own).
        max_seconds: refuse longer audio (default 600 s: 20 Whisper windows).

    Returns:
        A 1-D float32 array at 16 kHz. Silence is returned too (a warning is logged; see :func:`is_silent`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not audio, empty, not finite, of an ambiguous shape, without a sample rate, or too long.
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds={max_seconds} must be positive")
    if isinstance(path_or_array, tuple) and len(path_or_array) == 2 and sr is None:
        sr, path_or_array = path_or_array
    if isinstance(path_or_array, (str, os.PathLike)):
        if sr is not None:
            raise ValueError(f"sr={sr} was given with a file; a file carries its own sample rate, so leave sr=None")
        samples, sr, where = *_read_file(Path(path_or_array), max_seconds), str(path_or_array)
    else:
        if sr is None or int(sr) != sr or sr <= 0:
            raise ValueError(f"sr={sr!r}: an audio array needs its sample rate in Hz, e.g. sr=16000")
        samples, sr, where = _as_float(path_or_array), int(sr), "the audio array"
    mono = _downmix(samples, where)
    seconds = len(mono) / sr
    if seconds > max_seconds:
        raise ValueError(
            f"{where} lasts {seconds:.1f} s, longer than the cap max_seconds={max_seconds:g} s; "
            "trim it or raise max_seconds"
        )
    if not np.all(np.isfinite(mono)):
        raise ValueError(f"{where} contains NaN or infinite samples")
    if sr != SAMPLE_RATE:
        import soxr  # librosa's default resampler ("soxr_hq"), without librosa's import cost

        mono = soxr.resample(mono, sr, SAMPLE_RATE, quality="HQ")
    if is_silent(mono):
        log.warning("%s is silent (peak below %g); a transcript of it will be empty or invented", where, SILENCE)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _read_file(path: Path, max_seconds: float) -> tuple[np.ndarray, int]:
    import soundfile as sf

    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        info = sf.info(str(path))
        if info.frames > max_seconds * info.samplerate:  # refuse before decoding a long file
            raise ValueError(
                f"{path} lasts {info.frames / info.samplerate:.1f} s, longer than the cap "
                f"max_seconds={max_seconds:g} s; trim it or raise max_seconds"
            )
        samples, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path} is not an audio file soundfile can read ({e}); use WAV, FLAC, OGG or MP3") from None
    return samples, sr


def _as_float(array) -> np.ndarray:
    array = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if array.dtype.kind == "i":
        return array.astype(np.float32) / float(-np.iinfo(array.dtype).min)
    if array.dtype.kind == "u":
        half = float(np.iinfo(array.dtype).max // 2 + 1)
        return (array.astype(np.float32) - half) / half
    if array.dtype.kind != "f":
        raise ValueError(f"an audio array of dtype {array.dtype} is not audio; pass float or integer PCM samples")
    return array.astype(np.float32, copy=False)


def _downmix(samples: np.ndarray, where: str) -> np.ndarray:
    if samples.ndim == 2 and samples.shape[1] > samples.shape[0]:
        raise ValueError(
            f"{where} has shape {samples.shape}: read as (samples, channels) that is "
            f"{samples.shape[1]} channels; pass array.T if it is (channels, samples)"
        )
    if samples.ndim not in (1, 2):
        raise ValueError(f"{where} has shape {samples.shape}; expected (samples,) or (samples, channels)")
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    if mono.size == 0:
        raise ValueError(f"{where} is empty: it holds no samples")
    return mono


def is_silent(audio: np.ndarray, threshold: float = SILENCE) -> bool:
    """Whether the peak amplitude of ``audio`` is below ``threshold`` (default -80 dBFS)."""
    return bool(np.max(np.abs(audio)) < threshold) if np.size(audio) else True


def bundled_clips() -> dict[str, tuple[Path, str]]:
    """The English 16 kHz clips of ``pytest-audioeval`` with their reference transcripts.

    Returns:
        ``{name: (wav path, reference text)}`` for ``counting``, ``hello_world`` and ``quick_brown_fox``.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says what to install).
        FileNotFoundError: a clip or its reference is missing from the installed package.
    """
    folder = package_dir("pytest_audioeval", "pytest-audioeval==0.1.3") / "samples" / "audio" / "en"
    clips = {}
    for name in CLIPS:
        wav, txt = folder / f"{name}.wav", folder / f"{name}.txt"
        for path in (wav, txt):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; reinstall pytest-audioeval==0.1.3")
        clips[name] = (wav, txt.read_text(encoding="utf-8").strip())
    return clips


def _suppress_processor(model: nn.Module):
    """Whisper's ``suppress_tokens`` as a mask built once. transformers' own processor rebuilds it with
    ``torch.isin`` at every step, which takes up to a second per token on a CPU; the scores are the same."""
    from transformers import LogitsProcessor

    class SuppressMask(LogitsProcessor):
        def __init__(self, ids: list[int], vocab: int):
            self.mask = torch.zeros(vocab, dtype=torch.bool)
            self.mask[ids] = True

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores.masked_fill(self.mask.to(scores.device), -float("inf"))

    return SuppressMask(list(model.generation_config.suppress_tokens or []), model.config.vocab_size)


@torch.no_grad()
def transcribe(
    model: nn.Module,
    processor,
    audio,
    *,
    sr: int | None = None,
    max_new_tokens: int = 200,
    language: str | None = None,
    task: str | None = None,
) -> str:
    """Greedy transcription of one clip by a ``WhisperForConditionalGeneration``.

    Args:
        model, processor: a Whisper model and its ``WhisperProcessor`` (as the loaders return them).
        audio: a path, a ``(sr, array)`` pair, or an array at ``sr`` (default 16 kHz, as :func:`load_audio` gives).
        max_new_tokens: the most tokens to generate per 30 s window.
        language, task: for multilingual models, e.g. ``"en"`` and ``"transcribe"``; None detects the language.

    Returns:
        The transcript without special tokens, stripped. Audio over 30 s is transcribed window by window.

    Raises:
        ValueError: see :func:`load_audio`; a language or task given to an English-only model.
    """
    if not isinstance(audio, (str, os.PathLike, tuple)):
        sr = SAMPLE_RATE if sr is None else sr
    samples = load_audio(audio, sr)
    long_form = len(samples) > WINDOW_SECONDS * SAMPLE_RATE
    param = next(model.parameters())
    kwargs = {k: v for k, v in (("language", language), ("task", task)) if v is not None}
    if long_form:
        inputs = processor(
            samples,
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
            truncation=False,
            padding="longest",
            return_attention_mask=True,
        )
        kwargs.update(attention_mask=inputs.attention_mask.to(param.device), return_timestamps=True)
    else:
        inputs = processor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        kwargs.update(suppress_tokens=None, logits_processor=[_suppress_processor(model)])
    features = inputs.input_features.to(device=param.device, dtype=param.dtype)
    ids = model.generate(features, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **kwargs)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
CALIBRATION_LANGUAGES = ("es", "fr", "it", "pt", "pl", "hi", "ja", "zh")  # never the English evaluation clips


def calibration_clips() -> list[Path]:
    """The bundled speech that calibrates by default: every clip of ``pytest-audioeval`` in another
    language than English (24 clips), so the English clips the figures are measured on stay unseen.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says what to install).
    """
    root = package_dir("pytest_audioeval", "pytest-audioeval==0.1.3") / "samples" / "audio"
    return [path for lang in CALIBRATION_LANGUAGES for path in sorted((root / lang).glob("*.wav"))]


def audio_files(spec: str | os.PathLike) -> list[Path]:
    """The audio files ``spec`` names: one file, or every audio file in a folder (sorted).

    Raises:
        ValueError: nothing there, or a folder without audio files.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{str(spec)!r} is not a file or a folder of audio files (WAV, FLAC, OGG, MP3)")
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not found:
        raise ValueError(f"{path} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return found


@torch.no_grad()
def speech_batches(model: nn.Module, processor, clips: list, *, max_new_tokens: int = 64) -> list[dict]:
    """Calibration batches for a Whisper model: each clip's features, with the model's own greedy
    transcript as the decoder's input (so the decoder sees what it produces, in any language).

    Args:
        model, processor: a Whisper model and its processor.
        clips: audio files or arrays at 16 kHz (see :func:`load_audio`), each at most 30 s.
        max_new_tokens: the longest transcript generated per clip.

    Raises:
        ValueError: no clips, a file that is not audio, a silent clip or one over 30 s (each named).
    """
    if not clips:
        raise ValueError("no calibration clips; pass at least one audio file")
    param, batches = next(model.parameters()), []
    for clip in clips:
        samples = load_audio(clip, max_seconds=WINDOW_SECONDS)
        if is_silent(samples):
            where = Path(clip).name if isinstance(clip, (str, os.PathLike)) else "a calibration clip"
            raise ValueError(f"{where} is silent (no sample above -80 dBFS); calibrate on speech")
        features = processor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        features = features.to(device=param.device, dtype=param.dtype)
        ids = model.generate(
            features,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            suppress_tokens=None,
            logits_processor=[_suppress_processor(model)],
        )
        batches.append({"input_features": features, "decoder_input_ids": ids})
    return batches
