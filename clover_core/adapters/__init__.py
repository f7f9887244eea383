"""Architecture adapters: the only place that knows model types.

``ADAPTERS`` maps attention module classes to their adapter; lookup is by ``isinstance``.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, Factors, is_rank_major
from .diffusers_unet import Attention as DiffusersAttention
from .diffusers_unet import DiffusersAttentionAdapter
from .gpt2 import GPT2Adapter, GPT2Attention
from .llama import LlamaAdapter, LlamaAttention
from .whisper import WhisperAdapter, WhisperAttention

ADAPTERS: dict[type[nn.Module], Adapter] = {
    GPT2Attention: GPT2Adapter(),
    WhisperAttention: WhisperAdapter(),
    LlamaAttention: LlamaAdapter(),
    DiffusersAttention: DiffusersAttentionAdapter(),
}


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter for ``module``, or None when it is not a supported attention module."""
    for cls, adapter in ADAPTERS.items():
        if isinstance(module, cls):
            return adapter
    return None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, Adapter]]:
    """Every supported attention module of ``model``, outermost first, as ``(name, module, adapter)``.

    Raises:
        TypeError: ``model`` is not a torch module.
        NotImplementedError: the model contains no supported attention module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__} {model!r:.60}; load a model "
                        "first, e.g. clover_core.load_model(name).model")
    found = [(name, m, a) for name, m in model.named_modules() if (a := adapter_for(m)) is not None]
    if not found:
        supported = ", ".join(cls.__name__ for cls in ADAPTERS)
        raise NotImplementedError(
            f"{type(model).__name__} has no supported attention module; supported classes: {supported}"
        )
    return found


__all__ = ["ADAPTERS", "Adapter", "Factors", "adapter_for", "attention_modules", "is_rank_major"]
