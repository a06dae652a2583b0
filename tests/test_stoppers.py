"""Table-driven stopper tests: a sequence of values and the check at which the stopper fires."""
import math

import pytest

from src.Buliding_Units.StopperUnit import EarlyStoppingStopper, NonFiniteStopper, TargetStopper


def fire_index(stopper, key, values):
    for i, v in enumerate(values):
        if stopper.check({key: v, "round": i}):
            return i
    return None


@pytest.mark.parametrize("kwargs, values, expected", [
    (dict(monitor="test_loss", patience=2), [1.0, 0.9, 0.95, 0.93, 0.8], 3),
    (dict(monitor="test_loss", patience=3), [1.0, 0.9, 0.95, 0.93, 0.8], None),
    (dict(monitor="test_loss", patience=1), [1.0, 1.0], 1),  # equal is no improvement
    (dict(monitor="test_loss", patience=2, min_delta=0.1), [1.0, 0.9, 0.92], 2),  # a change equal to min_delta is none
    (dict(monitor="test_loss", patience=2, min_delta=0.1), [1.0, 0.89, 0.78, 0.7, 0.69], 4),
    (dict(monitor="test_accuracy", patience=2), [0.5, 0.6, 0.6, 0.55], 3),
    (dict(monitor="accuracy", patience=1, mode="min"), [0.5, 0.6], 1),
    (dict(monitor="loss", patience=5, divergence_threshold=10.0), [1.0, 2.0, 11.0], 2),
    (dict(monitor="loss", patience=5), [1.0, float("nan")], 1),
])
def test_early_stopping_table(kwargs, values, expected):
    stopper = EarlyStoppingStopper(**kwargs)
    assert fire_index(stopper, kwargs["monitor"], values) == expected
    if expected is not None:
        assert stopper.reason and stopper.message


@pytest.mark.parametrize("kwargs, key, values, expected", [
    (dict(monitor="test_accuracy", threshold=0.9), "test_accuracy", [0.5, 0.9, 0.91], 2),  # strict
    (dict(monitor="loss", threshold=0.1), "loss", [1.0, 0.1, 0.05], 2),
    (dict(monitor="loss", threshold=0.1, mode="max"), "loss", [0.05, 0.2], 1),
])
def test_target_table(kwargs, key, values, expected):
    assert fire_index(TargetStopper(**kwargs), key, values) == expected


@pytest.mark.parametrize("values, expected", [([1.0, 0.5, math.inf], 2), ([1.0, float("nan")], 1), ([1.0, 2.0], None)])
def test_non_finite_table(values, expected):
    stopper = NonFiniteStopper()
    assert fire_index(stopper, "loss", values) == expected
    if expected is not None:
        assert stopper.reason == "non_finite"


def test_bad_arguments():
    with pytest.raises(ValueError, match="nope"):
        EarlyStoppingStopper(monitor="nope")
    with pytest.raises(ValueError, match="patience"):
        EarlyStoppingStopper(patience=0)
    with pytest.raises(ValueError, match="mode"):
        TargetStopper(mode="up")


def test_missing_metric_is_named():
    with pytest.raises(KeyError, match="test_accuracy"):
        TargetStopper().check({"loss": 1.0, "test_loss": 1.0})


def test_state_dict_round_trip():
    a = EarlyStoppingStopper(patience=3)
    for v in (1.0, 1.1, 1.2):
        a.check({"test_loss": v})
    b = EarlyStoppingStopper(patience=3)
    b.load_state_dict(a.state_dict())
    assert b.check({"test_loss": 1.3}) and b.wait == 3
