"""Self-contained modeling code shipped inside pruned checkpoints, for ``trust_remote_code=True``.

The ``modeling_clover_*.py`` files (and ``clover_attention.py``) import only torch, transformers or
diffusers, never ``clover_core``: :func:`clover_core.save_pruned` copies the ones a model needs into
its folder and points ``config.json``'s ``auto_map`` at them, so the folder loads on any machine with
transformers (or diffusers) alone. The engine's adapters use the same pruned modules from here (one
copy of the code); ``tests/test_remote_code.py`` checks that a folder loaded in a fresh interpreter
without ``clover_core`` gives the engine's outputs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from diffusers import UNet2DConditionModel
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM, WhisperForConditionalGeneration

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SHARED = "clover_attention.py"

# model class -> (modeling file, class in it, auto classes that load it, files it imports relatively)
REMOTE: dict[type[nn.Module], tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    GPT2LMHeadModel: ("modeling_clover_gpt2", "CloverGPT2LMHeadModel", ("AutoModelForCausalLM",), (SHARED,)),
    LlamaForCausalLM: ("modeling_clover_llama", "CloverLlamaForCausalLM", ("AutoModelForCausalLM",), (SHARED,)),
    WhisperForConditionalGeneration: ("modeling_clover_whisper", "CloverWhisperForConditionalGeneration",
                                      ("AutoModelForSpeechSeq2Seq",), (SHARED,)),
    UNet2DConditionModel: ("modeling_clover_unet", "CloverUNet2DConditionModel", ("AutoModel",), ()),
}


def export_code(model: nn.Module, folder: Path) -> dict[str, str]:
    """Copy the modeling code ``model`` needs into ``folder``.

    Args:
        model: a pruned model.
        folder: the checkpoint folder being written.

    Returns:
        The ``auto_map`` entry for ``config.json`` (auto class -> ``"file.Class"``); empty when the
        model's class has no self-contained code (the folder then loads with ``clover_core.load_pruned``).
    """
    entry = REMOTE.get(type(model))
    if entry is None:
        supported = ", ".join(cls.__name__ for cls in REMOTE)
        log.warning("%s has no self-contained modeling code (supported: %s); the checkpoint will load with "
                    "clover_core.load_pruned only, not with trust_remote_code", type(model).__name__, supported)
        return {}
    module, cls, autos, extra = entry
    for name in (f"{module}.py", *extra):
        shutil.copyfile(HERE / name, folder / name)
    return {auto: f"{module}.{cls}" for auto in autos}


def base_class(name: str) -> type[nn.Module] | None:
    """The library class a shipped modeling class extends (``"CloverGPT2LMHeadModel"`` -> GPT2LMHeadModel):
    a folder re-saved from a model loaded with ``trust_remote_code`` names the shipped class."""
    return next((cls for cls, entry in REMOTE.items() if entry[1] == name), None)
