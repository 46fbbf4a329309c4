"""Run directories: the run itself, its checkpoints (atomic, verified, safe formats) and its lock."""
