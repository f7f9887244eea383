"""Self-contained modeling code shipped inside pruned checkpoints, for ``trust_remote_code=True``.

The ``modeling_clover_*.py`` files (and ``clover_attention.py``) import only torch, transformers or
diffusers, never ``clover_core``: :func:`clover_core.save_pruned` copies the ones a model needs into
its folder (each family's :class:`~clover_core.architectures.RemoteCode` names them) and points
``config.json``'s ``auto_map`` at them, so the folder loads on any machine with transformers (or
diffusers) alone. The engine's adapters use the same pruned modules from here (one copy of the code);
``tests/test_remote_code.py`` checks that a folder loaded in a fresh interpreter without
``clover_core`` gives the engine's outputs.
"""
