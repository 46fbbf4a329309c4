"""Why a model learns what it does: gradient through time, the delayed-recall task, plots."""
