"""charlm: train, sample and evaluate recurrent (LSTM/GRU/RNN) language models.

The public API (see the README)::

    import charlm
    result = charlm.train(["corpus.txt"], out="checkpoints/x", hidden=256, max_time="10m")
    model = charlm.load("checkpoints/x")
    text = model.sample(prime="The ", length=200, temperature=0.8, seed=1)
    for piece in model.stream(prime="The ", length=200, seed=1): ...
    score = model.evaluate(some_text)               # .loss .perplexity .bpc .tokens .characters
    model.next_token_probs("The quick brown fo")    # [(piece, probability), ...]

Names load on first use (PEP 562), so ``charlm --help`` and ``import charlm`` stay instant: torch
is imported when a function that needs it is first reached.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "train": "charlm.api",
    "load": "charlm.api",
    "Model": "charlm.api",
    "TrainResult": "charlm.training.report",
    "StepReport": "charlm.training.report",
    "Callbacks": "charlm.training.report",
    "SilentCallbacks": "charlm.training.report",
    "EvalResult": "charlm.model.scoring",
    "CharlmError": "charlm.errors",
    "ConfigError": "charlm.errors",
    "CorpusError": "charlm.errors",
    "CheckpointError": "charlm.errors",
    "TrainingError": "charlm.errors",
    "RunConfig": "charlm.config",
    "ModelConfig": "charlm.config",
    "TrainConfig": "charlm.config",
    "TokenizerConfig": "charlm.config",
    "SampleConfig": "charlm.config",
}
__all__ = [  # noqa: RUF022 (grouped as _EXPORTS)
    "__version__",
    "train",
    "load",
    "Model",
    "TrainResult",
    "StepReport",
    "Callbacks",
    "SilentCallbacks",
    "EvalResult",
    "CharlmError",
    "ConfigError",
    "CorpusError",
    "CheckpointError",
    "TrainingError",
    "RunConfig",
    "ModelConfig",
    "TrainConfig",
    "TokenizerConfig",
    "SampleConfig",
]

if TYPE_CHECKING:
    from charlm.api import Model, load, train
    from charlm.config import ModelConfig, RunConfig, SampleConfig, TokenizerConfig, TrainConfig
    from charlm.errors import CharlmError, CheckpointError, ConfigError, CorpusError, TrainingError
    from charlm.model.scoring import EvalResult
    from charlm.training.report import Callbacks, SilentCallbacks, StepReport, TrainResult


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'charlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
