"""The web app's backend: everything ``app.py`` shows, computed without any UI code, on top of
``clover_core`` (which never imports this package, so the engine stays importable without gradio).

- :mod:`.cache`: models loaded and decomposed once, shared read-only, LRU under a memory budget.
- :mod:`.session`: one pruning setting -> the vanilla and CLOVER models, their sizes and quality.
- :mod:`.outputs`: text, transcripts and images of each model, and the caps on user input.
- :mod:`.downloads`: the swept scratch folder and zipped checkpoints.
- :mod:`.heads`: per-head summaries of a decomposition for the plots.
"""
