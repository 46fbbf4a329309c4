"""The configs are declared: types and bounds refuse bad values with an error naming the field, by
keyword only, and every face words the field its own way."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from charlm.cli.options import flag
from charlm.config import (
    Cell,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TokenizerConfig,
    TrainConfig,
    parse_duration,
    parse_save_every,
)
from charlm.errors import ConfigError

CONFIGS = (TokenizerConfig, ModelConfig, TrainConfig, SampleConfig)


@pytest.mark.parametrize("cls", CONFIGS)
def test_configs_are_built_by_keyword_only(cls: type) -> None:
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(TypeError, match="positional argument"):
        cls(getattr(cls(), first))
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        cls(nonsense=1)


@pytest.mark.parametrize(
    ("cls", "field", "value", "message"),
    [
        (SampleConfig, "temperature", -1.0, "temperature must not be negative, got -1.0"),
        (SampleConfig, "top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        (SampleConfig, "min_p", 1.0, "min_p must be in [0, 1), got 1.0"),
        (SampleConfig, "length", 2.5, "length must be a whole number, got 2.5"),
        (SampleConfig, "num_samples", 0, "num_samples must be positive, got 0"),
        (TrainConfig, "val_fraction", 1.0, "val_fraction must be in (0, 1), got 1.0"),
        (TrainConfig, "lr", math.inf, "lr must be a finite number, got inf"),
        (TrainConfig, "save_seconds", 0.0, "save_seconds must be positive, got 0.0"),
        (ModelConfig, "dropout", 1.0, "dropout must be in [0, 1), got 1.0"),
        (ModelConfig, "cell", "lsmt", "cell is one of lstm, gru, rnn, irnn, mingru, minlstm, not 'lsmt'"),
        (TokenizerConfig, "vocab_size", 0, "vocab_size must be positive, got 0"),
    ],
)
def test_a_refusal_names_its_field(cls: type, field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        cls(**{field: value})
    assert str(caught.value) == message
    assert caught.value.fields == (field,)
    assert caught.value.exit_code == 2


def test_each_face_words_the_field_its_own_way() -> None:
    with pytest.raises(ConfigError) as caught:
        SampleConfig(temperature=-1)
    assert caught.value.worded(flag) == "--temp must not be negative, got -1"
    assert caught.value.worded(lambda name: f"'{name}'") == "'temperature' must not be negative, got -1"
    with pytest.raises(ConfigError) as caught:
        ModelConfig(cell=Cell.mingru, hidden=64, embed=32)
    worded = caught.value.worded(flag)
    assert worded.startswith("--cell mingru embeds tokens in its width: --embed must equal --hidden")


def test_replace_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="lr must be positive"):
        dataclasses.replace(TrainConfig(), lr=-0.1)


def test_durations_name_their_field() -> None:
    assert parse_duration("1h30m") == 5400.0
    assert parse_save_every("500") == (500, None)
    assert parse_save_every("90s") == (None, 90.0)
    with pytest.raises(ConfigError) as caught:
        parse_duration("soon")
    assert caught.value.worded(flag).startswith("--max-time: cannot read 'soon'")
    with pytest.raises(ConfigError) as caught:
        parse_save_every("0")
    assert caught.value.worded(flag) == "--save-every must be positive, got 0"


@given(
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    top_p=st.floats(allow_nan=True, allow_infinity=True),
    top_k=st.integers(-5, 50),
    min_p=st.floats(-1, 2),
)
def test_a_sample_config_is_made_or_refused_never_half_checked(
    temperature: float, top_p: float, top_k: int, min_p: float
) -> None:
    """Whatever the numbers, the result is a config inside its declared bounds or a ConfigError
    naming one of the fields given: never a NaN config, never another exception."""
    try:
        config = SampleConfig(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    except ConfigError as exc:
        assert exc.fields and exc.fields[0] in ("temperature", "top_p", "top_k", "min_p")
        assert str(exc).startswith(exc.fields[0])
        return
    assert math.isfinite(config.temperature) and config.temperature >= 0
    assert 0 < config.top_p <= 1 and config.top_k >= 0 and 0 <= config.min_p < 1


@given(
    cell=st.sampled_from(list(Cell)),
    layers=st.integers(1, 4),
    hidden=st.integers(1, 64),
    dropout=st.floats(0, 0.9),
    batch_size=st.integers(1, 64),
    lr=st.none() | st.floats(1e-5, 10),
)
def test_a_run_config_round_trips_through_json(
    cell: Cell, layers: int, hidden: int, dropout: float, batch_size: int, lr: float | None
) -> None:
    config = RunConfig(
        tokenizer=TokenizerConfig(),
        model=ModelConfig(cell=cell, layers=layers, hidden=hidden, dropout=dropout),
        train=TrainConfig(batch_size=batch_size, lr=lr),
        corpus=("a.txt",),
    )
    assert RunConfig.from_dict(config.to_dict()) == config


def test_a_saved_config_of_another_shape_is_refused_as_a_config() -> None:
    data = RunConfig(tokenizer=TokenizerConfig(), model=ModelConfig()).to_dict()
    data["model"]["wings"] = 2
    with pytest.raises(ConfigError, match="not a charlm run config"):
        RunConfig.from_dict(data)
    data["model"].pop("wings")
    data["train"]["lr"] = -1
    with pytest.raises(ConfigError, match="not a charlm run config: lr must be positive"):
        RunConfig.from_dict(data)
