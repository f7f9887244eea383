"""The pruning record: what a pruned model carries in its config (``config.clover``).

It says how the model was pruned (method, mode, target, ratio or threshold), every head's kept rank,
and where the model comes from: the base model's Hub id and its sizes before pruning, measured when it
is pruned so that a model card written later is still exact. ``load_pruned`` rebuilds a model from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .metrics import kv_cache_bytes_per_token, parameter_count

if TYPE_CHECKING:
    from .calibrate import CalibrationStats
    from .prune import PruneConfig

FORMAT = "clover-studio/1"


def pruning_meta(
    model: nn.Module,
    config: PruneConfig,
    ranks: dict[str, dict[str, list[int]]],
    *,
    base: dict | None = None,
    calibration: CalibrationStats | None = None,
) -> dict:
    """The ``clover`` record of ``model`` pruned by ``config`` to ``ranks``, with the base model and
    its sizes before pruning (for the model card; ``base`` when already computed for ``model``) and,
    for a calibrated prune, what calibrated it (statistic, data, tokens, damping)."""
    base = origin(model, pruning_record(model)) if base is None else base
    calibrated = {} if calibration is None else {"calibration": calibration.describe()}
    if getattr(config, "allocation", "raw") != "raw":  # recorded where it is not the paper's
        calibrated["allocation"] = config.allocation
    return {
        "format": FORMAT,
        "method": config.method,
        "mode": config.mode,
        "target": config.target,
        "ratio": config.ratio,
        "threshold": config.threshold,
        "ranks": ranks,
        **calibrated,
        **base,
    }


def record(model: nn.Module, meta: dict) -> None:
    """Store the pruning record in the model's config (diffusers configs are frozen: registered)."""
    if hasattr(model, "register_to_config"):
        model.register_to_config(clover=meta)
    else:
        model.config.clover = meta


def pruning_record(model: nn.Module) -> dict | None:
    """The ``clover`` entry of a pruned model's config, or None for a model that was not pruned."""
    config = getattr(model, "config", None)
    meta = config.get("clover") if isinstance(config, dict) else getattr(config, "clover", None)
    return meta if isinstance(meta, dict) else None


def origin(model: nn.Module, earlier: dict | None) -> dict:
    """What a pruned model comes from, for its pruning record: the base model's Hub id (None when not
    known) and its sizes before pruning. A model pruned twice keeps the first origin.

    Args:
        model: the model about to be pruned.
        earlier: its own pruning record, when it was pruned before.
    """
    if earlier and isinstance(earlier.get("before"), dict):
        return {"base_model": earlier.get("base_model"), "before": earlier["before"]}
    dtype = next(model.parameters()).dtype
    return {
        "base_model": hub_id(model),
        "before": {
            "parameters": parameter_count(model),
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model),
            "dtype": dtype_name(dtype),
        },
    }


def hub_id(model: nn.Module) -> str | None:
    """The Hub repository the model was loaded from (its config's ``_name_or_path``), or None when it
    was built from a config or read from a local folder (a local path is not published)."""
    config = getattr(model, "config", None)
    name = config.get("_name_or_path") if isinstance(config, dict) else getattr(config, "_name_or_path", None)
    if not isinstance(name, str) or not name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")
