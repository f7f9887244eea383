"""Attention for pruned heads: query/key width != value width, and the ORIGINAL softmax scale.

The pruned modules live in ``remote/`` (one ``modeling_clover_*.py`` per architecture), the very code
that every pruned checkpoint carries for ``trust_remote_code=True`` loading, so the engine and a
checkpoint loaded without this project run the same lines. They all call :func:`attend`, which
dispatches to the model's configured attention implementation (SDPA by default, which accepts a value
width different from the key width) and never infers the scale from the pruned key width (the public
reference code does, and so changes the model). Layers with ragged per-head ranks store
:func:`padded_width` features per head; shorter heads are zero-padded (exact: a zero column changes
neither scores nor outputs), and a width of at least 1 keeps every kernel happy when a layer is emptied.
"""

from __future__ import annotations

from .remote.clover_attention import attend, eager_attention, padded_width

__all__ = ["attend", "eager_attention", "padded_width"]
