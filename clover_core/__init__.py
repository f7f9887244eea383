"""CLOVER Studio's engine: orthogonalize attention heads, inspect their spectra, prune them.

Public API (re-exported here; no logic in this file)::

    import clover_core as cc
    bundle = cc.load_model(name_or_path)
    dec = cc.decompose(bundle.model)
    spec = cc.spectra(dec)
    pruned = cc.prune(dec, ratio=0.5, target="qk", method="clover", mode="uniform")
    cc.save_pruned(pruned, out_dir)
    again = cc.load_pruned(out_dir)
"""

from . import finetune
from .calibrate import CalibrationStats, calibrate, calibrate_while, norm_statistics, text_batches
from .decompose import Decomposition, decompose, spectra
from .io.checkpoint import load_pruned, save_pruned
from .models import ModelBundle, load_model
from .orthogonalize import orthogonalize
from .prune import PruneConfig, plan, prune
from .slider import Slider

__all__ = [
    "CalibrationStats",
    "calibrate",
    "calibrate_while",
    "text_batches",
    "Decomposition",
    "ModelBundle",
    "PruneConfig",
    "Slider",
    "decompose",
    "finetune",
    "load_model",
    "load_pruned",
    "norm_statistics",
    "orthogonalize",
    "plan",
    "prune",
    "save_pruned",
    "spectra",
]
