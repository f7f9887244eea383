"""Files: the one atomic folder writer, model folders' config and weight files, pruned checkpoints
(saved, loaded, streamed larger than memory) and their model cards."""
