"""Serving side of loraloop: the inference worker, its adapter manager and micro-batching policy."""
