"""The ``README.md`` model card of a pruned checkpoint, and the figures it reports.

The card's YAML front matter is what the Hugging Face Hub reads (``base_model``, ``library_name``,
``tags``); its body says how the model was pruned, what it saves (parameters and KV-cache bytes per
token, before and after) and how to load it. The "before" figures are measured when the model is
pruned (:func:`clover_core.record.origin`) and travel in the pruning record, so a card written later is still exact.
"""

from __future__ import annotations

import torch
from huggingface_hub import ModelCardData
from torch import nn

from ..metrics import kv_cache_bytes_per_token, parameter_count
from ..record import dtype_name

CARD = "README.md"
TAGS = ["clover", "pruning"]
PIPELINE_TAGS = {"AutoModelForCausalLM": "text-generation", "AutoModelForSpeechSeq2Seq": "automatic-speech-recognition"}
TARGETS = {"qk": "Q-K (queries and keys)", "vo": "V-O (values and outputs)", "both": "Q-K and V-O"}


def model_card(
    model: nn.Module, record: dict, repo: str, auto_map: dict[str, str], dtype: torch.dtype | None = None
) -> str:
    """The ``README.md`` text for a pruned model.

    Args:
        model: the pruned model being saved.
        record: its pruning record (``config.clover``).
        repo: the folder / repository name used in the loading examples.
        auto_map: the ``auto_map`` written to ``config.json`` (empty: no self-contained code).
        dtype: the dtype the weights are saved in; default: the model's.

    Returns:
        Markdown with YAML front matter.
    """
    diffusers = hasattr(model, "register_to_config")
    meta = ModelCardData(
        base_model=record.get("base_model"),
        library_name="diffusers" if diffusers else "transformers",
        tags=TAGS,
        pipeline_tag=next((PIPELINE_TAGS[a] for a in auto_map if a in PIPELINE_TAGS), None),
    )
    body = [
        f"# {repo}",
        "",
        _summary(record),
        "",
        _pruning_table(record),
        "",
        _sizes_table(model, record, dtype or next(model.parameters()).dtype),
        "",
        "## How to load",
        "",
        _loading(auto_map, repo, record.get("base_model"), diffusers),
    ]
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def _summary(record: dict) -> str:
    base = f"`{record['base_model']}`" if record.get("base_model") else "A model"
    return (
        f"{base} with its attention heads pruned by CLOVER (Cross-Layer Orthogonal Vectors, "
        "[arXiv:2411.17426](https://arxiv.org/abs/2411.17426)): each head's query-key and value-output "
        "weight pairs are rewritten in their singular-vector basis, and the weakest directions are removed. "
        "Where heads keep different numbers of directions, each layer stores its largest and shorter heads "
        "are zero-padded; the counts below exclude the padding."
    )


def _pruning_table(record: dict) -> str:
    amount = (
        f"| threshold | {record.get('threshold')} |"
        if record.get("mode") == "threshold"
        else f"| ratio | {record.get('ratio')} (fraction of directions removed) |"
    )
    return "\n".join(
        [
            "| pruning | |",
            "|---|---|",
            f"| method | {record.get('method')} |",
            f"| target | {TARGETS.get(record.get('target'), record.get('target'))} |",
            f"| mode | {record.get('mode')} |",
            amount,
            _calibration_row(record.get("calibration")),
        ]
    )


def _calibration_row(calibration: dict | None) -> str:
    if not isinstance(calibration, dict):
        return "| scores | data-free (the weights alone) |"
    return (
        f"| scores | calibrated: {calibration.get('statistic')} of {_number(calibration.get('tokens'))} tokens of "
        f"{calibration.get('data')} (damping {calibration.get('damp')}) |"
    )


def _sizes_table(model: nn.Module, record: dict, dtype: torch.dtype) -> str:
    before = record.get("before") or {}
    after_kv = _in_dtype(kv_cache_bytes_per_token(model), next(model.parameters()).dtype, dtype)
    before_kv = (
        _in_dtype(before["kv_cache_bytes_per_token"], getattr(torch, before["dtype"]), dtype)
        if "kv_cache_bytes_per_token" in before
        else None
    )
    kv = (
        f"| KV-cache bytes per token ({dtype_name(dtype)}) | {_number(before_kv)} | {_number(after_kv)} |"
        if after_kv or before_kv
        else "| KV-cache bytes per token | none (no KV cache) | none |"
    )
    return "\n".join(
        [
            "| size | before | after |",
            "|---|---|---|",
            f"| parameters | {_number(before.get('parameters'))} | {_number(parameter_count(model))} |",
            kv,
        ]
    )


def _in_dtype(nbytes: int, measured: torch.dtype, wanted: torch.dtype) -> int:
    """Bytes measured in one dtype, expressed in another (same number of elements)."""
    return nbytes // measured.itemsize * wanted.itemsize


def _number(value: int | None) -> str:
    return "not recorded" if value is None else f"{value:,}"


def _loading(auto_map: dict[str, str], repo: str, base: str | None, diffusers: bool) -> str:
    parts = []
    if diffusers and auto_map:
        pipeline = base or "stabilityai/stable-diffusion-xl-base-1.0"  # the base is not recorded: an example
        parts += [
            "With diffusers alone (the folder carries its modeling code; plain "
            "`UNet2DConditionModel.from_pretrained` refuses it, the attention shapes differ):",
            "",
            "```python",
            "from diffusers import AutoModel, StableDiffusionXLPipeline",
            "",
            f'unet = AutoModel.from_pretrained("{repo}", trust_remote_code=True)',
            f'pipe = StableDiffusionXLPipeline.from_pretrained("{pipeline}", unet=unet)'
            + ("" if base else "  # the SDXL pipeline this UNet was pruned from"),
            "```",
            "",
        ]
    elif auto_map:
        auto = next(iter(auto_map))
        parts += [
            "With transformers alone (the folder carries its modeling code):",
            "",
            "```python",
            f"from transformers import {auto}",
            "",
            f'model = {auto}.from_pretrained("{repo}", trust_remote_code=True)',
            "```",
            "",
        ]
    parts += [
        "With CLOVER Studio (no remote code; download the folder first, e.g. with "
        "`huggingface_hub.snapshot_download`):",
        "",
        "```python",
        "import clover_core as cc",
        "",
        f'model = cc.load_pruned("{repo}")',
        "```",
    ]
    return "\n".join(parts)
