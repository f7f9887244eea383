"""The evaluation data that ships with the project (``assets/``)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WIKITEXT = ASSETS / "data" / "wikitext-2-raw-v1-test.jsonl"
TEXTS = ASSETS / "texts"
HELDOUT_PLAYS = ("hamlet", "macbeth", "tempest")  # never seen by gpt2-shakespeare in training
VALIDATION_PLAY = "julius_caesar"


@lru_cache(maxsize=1)
def wikitext_test() -> str:
    """WikiText-2 raw test, rows joined with ``"\\n\\n"`` (the standard perplexity protocol)."""
    if not WIKITEXT.is_file():
        raise FileNotFoundError(f"{WIKITEXT} is missing; it ships with the project (git checkout assets/)")
    rows = [json.loads(line) for line in WIKITEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    return "\n\n".join(rows)


def wikitext_ids(tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The first ``max_tokens`` tokens of WikiText-2 test as a 1-D LongTensor.

    Raises:
        ValueError: no tokenizer, or ``max_tokens`` < 2.
    """
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so text perplexity cannot be measured")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} is too small; perplexity needs at least 2 tokens")
    text = wikitext_test()
    if max_tokens is not None:
        text = text[: max_tokens * 12]  # ~4 characters a token: tokenize only what is needed
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids[:max_tokens]


def bundled_text(name: str) -> str:
    """A public-domain text shipped in ``assets/texts/`` (see its ATTRIBUTION.md), by file stem.

    Raises:
        ValueError: no such text; the message lists the ones there are.
    """
    path = TEXTS / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in TEXTS.glob("*.txt"))
        raise ValueError(f"text={name!r} is not bundled; choose one of {', '.join(known)}")
    return path.read_text(encoding="utf-8")


def heldout_shakespeare() -> str:
    """The held-out plays of ``gpt2-shakespeare`` (Hamlet, Macbeth, The Tempest), joined by blank lines."""
    return "\n\n".join(bundled_text(name) for name in HELDOUT_PLAYS)


def hamlet_ids(tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The first ``max_tokens`` tokens of *Hamlet* (``assets/texts/hamlet.txt``) as a 1-D LongTensor.

    Raises:
        ValueError: no tokenizer, or ``max_tokens`` < 2.
    """
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so text perplexity cannot be measured")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} is too small; perplexity needs at least 2 tokens")
    ids = tokenizer(bundled_text("hamlet"), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids[:max_tokens]


CALIBRATION_DEFAULT = "paradise_lost"  # Milton, not WikiText-2 nor the plays any figure is measured on


def calibration_text(spec: str | os.PathLike) -> tuple[str, str]:
    """The text to calibrate on, and its name for the record: ``"default"`` is the bundled *Paradise
    Lost* (never an evaluation text here); anything else is a UTF-8 text file.

    Raises:
        ValueError: the file is missing, a folder, not UTF-8 text, or empty.
    """
    if str(spec) == "default":
        return bundled_text(CALIBRATION_DEFAULT), f"{CALIBRATION_DEFAULT}.txt (bundled)"
    path = Path(spec)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not a file"
        raise ValueError(
            f"calibration={str(spec)!r} is {what}; pass a UTF-8 text file, or 'default' for the bundled Paradise Lost"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} is not UTF-8 text; calibration reads a plain text file") from None
    if not text.strip():
        raise ValueError(f"{path.name} is empty; calibration needs text to run the model on")
    return text, path.name
