"""``loraloop demo``: the whole continual-learning loop in one process."""
