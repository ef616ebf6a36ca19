"""`facefed train --config`: the [training] table's keys are checked, typos named."""

import tomllib

import pytest

from facefed.client.federated.config import (
    TrainingConfig,
    run_config_keys,
    training_table,
)
from facefed.core.errors import ConfigurationError


def _table(text: str) -> dict[str, object]:
    return training_table(tomllib.loads(text), "run.toml")


def test_a_table_of_known_keys_is_read_as_written():
    table = _table(
        '[training]\nsites = ["a", "b", "c"]\nnum-rounds = 3\n'
        'secure-aggregation = "secaggplus"\nsecagg-threshold = 2\n'
    )
    assert table == {
        "sites": ["a", "b", "c"],
        "num-rounds": 3,
        "secure-aggregation": "secaggplus",
        "secagg-threshold": 2,
    }


def test_every_run_config_key_is_accepted_in_a_file():
    defaults = {
        key: value
        for key, value in TrainingConfig().to_flower().items()
        if key != "site-dirs"
    }
    assert set(defaults) | {"site-dirs"} == set(run_config_keys())
    lines = "\n".join(f"{key} = {value!r}" for key, value in defaults.items())
    text = "[training]\n" + lines.replace("True", "true").replace("False", "false")
    assert _table(text) == defaults


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("secagg-treshold", "secagg-threshold"),
        ("secagg_threshold", "secagg-threshold"),
        ("num-round", "num-rounds"),
        ("site", "sites"),
    ],
)
def test_a_misspelt_key_is_refused_with_the_closest_known_key(key, suggestion):
    with pytest.raises(ConfigurationError) as refused:
        _table(f'[training]\nsites = ["a", "b"]\n{key} = 2\n')
    message = str(refused.value)
    assert f"unknown key {key!r}" in message
    assert f"Did you mean {suggestion!r}?" in message
    assert "run.toml" in message


def test_a_key_like_no_other_lists_the_known_keys():
    with pytest.raises(ConfigurationError, match=r"Known keys: .*secagg-threshold"):
        _table('[training]\nsites = ["a"]\nzzz = 1\n')


@pytest.mark.parametrize(
    "text",
    [
        'sites = ["a", "b"]\nnum-rounds = 2\n',
        'training = "yes"\n',
        '[train]\nsites = ["a", "b"]\n',
    ],
)
def test_a_file_without_a_training_table_is_refused(text):
    with pytest.raises(ConfigurationError, match=r"run.toml has no \[training\] table"):
        _table(text)


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        (
            {"secure-aggregation": "secaggplus", "secagg-threshold": 1},
            "secagg-threshold must be an integer of at least 2, got 1.",
        ),
        (
            {"secure-aggregation": "secaggplus", "secagg-threshold": 3},
            "SecAgg+ needs at least secagg-threshold=3 sites",
        ),
        (
            {"secure-aggregation": "secaggplus", "central-dp": "server-fixed"},
            "cannot be combined with central-dp='server-fixed'",
        ),
        ({"secagg-clipping-range": -1.0}, "secagg-clipping-range must be positive"),
    ],
)
def test_run_config_errors_name_keys_in_kebab_case(flat, message):
    with pytest.raises(ConfigurationError) as refused:
        TrainingConfig.from_flower(
            {"site-dirs": "a,b", "min-sites": 2, **flat}, kebab_case_errors=True
        )
    assert message in str(refused.value)
    assert "secagg_" not in str(refused.value)
