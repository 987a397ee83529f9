"""Learning-rate schedules: the pure functions, their TF twins, and the --lr_schedule factory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from training import schedules
from training.schedules import (
    SCHEDULES,
    LearningRateSchedule,
    constant,
    cosine,
    make_schedule,
    one_cycle,
)

TOTAL = 100


def test_registry_names_match_the_flag_choices():
    assert set(SCHEDULES) == {"constant", "cosine", "one-cycle"}
    assert SCHEDULES["one-cycle"] is one_cycle


def test_constant_is_base_lr_everywhere():
    assert [constant(s, TOTAL, 0.01) for s in (0, 1, 50, 99, 100, 500)] == [0.01] * 6


def test_cosine_without_warmup_starts_at_base_and_ends_at_zero():
    assert cosine(0, TOTAL, 0.1) == pytest.approx(0.1)
    assert cosine(TOTAL // 2, TOTAL, 0.1) == pytest.approx(0.05)
    assert cosine(TOTAL, TOTAL, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert 0 < cosine(TOTAL - 1, TOTAL, 0.1) < 1e-4


def test_cosine_warmup_is_linear_then_decays_monotonically_to_zero():
    warmup = 10
    lrs = [cosine(s, TOTAL, 0.1, warmup_steps=warmup) for s in range(TOTAL + 1)]
    np.testing.assert_allclose(lrs[: warmup + 1], 0.1 * np.arange(warmup + 1) / warmup)
    assert lrs[warmup] == pytest.approx(0.1)  # the peak
    assert max(lrs) == pytest.approx(0.1)
    assert np.all(np.diff(lrs[warmup:]) < 0)
    # Half way through the decay phase the cosine is at half the peak.
    assert lrs[warmup + (TOTAL - warmup) // 2] == pytest.approx(0.05)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_one_cycle_key_points_match_pytorch_onecycle():
    # PyTorch OneCycleLR(max_lr=1, total_steps=100, pct_start=0.3) (cos, two phases): the peak is
    # at step pct_start * total - 1 = 29, the minimum at step total - 1 = 99.
    start, peak, end = 1.0 / 25.0, 1.0, 1.0 / 25.0 / 1e4
    assert one_cycle(0, TOTAL, 1.0) == pytest.approx(start)
    assert one_cycle(29, TOTAL, 1.0) == pytest.approx(peak)
    assert one_cycle(99, TOTAL, 1.0) == pytest.approx(end)
    # Cosine halfway points of each phase.
    assert one_cycle(14.5, TOTAL, 1.0) == pytest.approx((start + peak) / 2)
    assert one_cycle(64, TOTAL, 1.0) == pytest.approx((peak + end) / 2)
    lrs = [one_cycle(s, TOTAL, 1.0) for s in range(TOTAL)]
    assert int(np.argmax(lrs)) == 29
    assert np.all(np.diff(lrs[:30]) > 0) and np.all(np.diff(lrs[29:]) < 0)


def test_one_cycle_parameters_move_the_key_points():
    lr = 0.5
    assert one_cycle(0, 200, lr, div_factor=10.0) == pytest.approx(0.05)
    assert one_cycle(199, 200, lr, div_factor=10.0, final_div_factor=100.0) == pytest.approx(5e-4)
    assert one_cycle(99, 200, lr, pct_start=0.5) == pytest.approx(lr)
    assert one_cycle(98, 200, lr, pct_start=0.5) < lr


def test_steps_outside_the_run_are_clamped():
    assert cosine(-5, TOTAL, 0.1) == cosine(0, TOTAL, 0.1)
    assert cosine(TOTAL + 50, TOTAL, 0.1, warmup_steps=5) == cosine(TOTAL, TOTAL, 0.1)
    assert one_cycle(TOTAL + 50, TOTAL, 1.0) == one_cycle(TOTAL - 1, TOTAL, 1.0)


_SCHEDULE_CASES = [
    ("constant", {}),
    ("cosine", {}),
    ("cosine", {"warmup_steps": 7}),
    ("one-cycle", {}),
    ("one-cycle", {"pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0}),
]


@pytest.mark.parametrize(
    "name, params, total_steps",
    [
        (name, params, total)
        for name, params in _SCHEDULE_CASES
        for total in (1, 3, 37, 1000)
        if params.get("warmup_steps", 0) < total
    ],
)
def test_tf_schedule_equals_pure_function(name, params, total_steps):
    schedule = LearningRateSchedule(name, 0.03, total_steps, **params)
    steps = sorted({*range(0, min(total_steps, 60)), *range(0, total_steps + 20, 7), total_steps})
    expected = [SCHEDULES[name](s, total_steps, 0.03, **params) for s in steps]

    # Graph mode with an int64 step tensor, as the optimizer calls it.
    graph_fn = tf.function(schedule, input_signature=[tf.TensorSpec([], tf.int64)])
    in_graph = [float(graph_fn(tf.constant(s, tf.int64))) for s in steps]
    # Eagerly, on a vector of steps.
    eager = schedule(tf.constant(steps)).numpy()

    np.testing.assert_allclose(in_graph, expected, rtol=1e-5, atol=0)
    np.testing.assert_allclose(eager, expected, rtol=1e-5, atol=0)


def test_optimizer_uses_the_schedule_at_each_update():
    schedule = make_schedule("cosine", 0.1, 8, warmup_steps=3)
    optimizer = tf_keras.optimizers.SGD(learning_rate=schedule)
    weight = tf.Variable(0.0)

    @tf.function
    def train_step():
        optimizer.apply_gradients([(tf.constant(1.0), weight)])

    moves = []
    for _ in range(10):
        before = weight.numpy()
        train_step()
        moves.append(before - weight.numpy())
    expected = [cosine(s, 8, 0.1, warmup_steps=3) for s in range(10)]
    np.testing.assert_allclose(moves, expected, rtol=1e-5, atol=1e-7)
    assert moves[0] == 0.0 and moves[3] == pytest.approx(0.1)


def test_schedule_serialises_and_deserialises_without_custom_objects():
    schedule = make_schedule("one-cycle", 0.2, 50, pct_start=0.4)
    assert schedule.get_config() == {
        "name": "one-cycle",
        "base_lr": 0.2,
        "total_steps": 50,
        "pct_start": 0.4,
    }
    restored = tf_keras.optimizers.schedules.deserialize(
        tf_keras.optimizers.schedules.serialize(schedule)
    )
    assert isinstance(restored, LearningRateSchedule)
    steps = tf.range(55)
    np.testing.assert_array_equal(restored(steps).numpy(), schedule(steps).numpy())
    optimizer = tf_keras.optimizers.deserialize(
        tf_keras.optimizers.serialize(tf_keras.optimizers.Adam(learning_rate=schedule))
    )
    assert isinstance(optimizer._learning_rate, LearningRateSchedule)
    assert optimizer._learning_rate.get_config() == schedule.get_config()


def test_make_schedule_constant_is_a_plain_float():
    lr = make_schedule("constant", 0.01, 100)
    assert type(lr) is float and lr == 0.01
    # So ReduceLROnPlateau can change it on the optimizer.
    optimizer = tf_keras.optimizers.SGD(learning_rate=lr)
    optimizer.learning_rate = 0.001
    assert optimizer.learning_rate.numpy() == pytest.approx(0.001)


@pytest.mark.parametrize("name", ["cosine", "one-cycle"])
def test_make_schedule_others_are_schedules(name):
    schedule = make_schedule(name, 0.01, 100)
    assert isinstance(schedule, LearningRateSchedule)
    assert float(schedule(50)) == pytest.approx(SCHEDULES[name](50, 100, 0.01), rel=1e-6)


@pytest.mark.parametrize("bad", ["linear", "Cosine", "one_cycle", ""])
def test_unknown_name_says_which_flag_and_choices(bad):
    with pytest.raises(ValueError, match="--lr_schedule") as error:
        make_schedule(bad, 0.01, 100)
    for choice in SCHEDULES:
        assert choice in str(error.value)
    with pytest.raises(ValueError, match="--lr_schedule"):
        LearningRateSchedule(bad, 0.01, 100)


@pytest.mark.parametrize(
    "call",
    [
        lambda: make_schedule("cosine", 0.01, 0),
        lambda: make_schedule("constant", 0.0, 10),
        lambda: make_schedule("cosine", 0.01, 10, warmup_steps=10),
        lambda: make_schedule("one-cycle", 0.01, 10, pct_start=1.0),
        lambda: make_schedule("one-cycle", 0.01, 10, div_factor=0.0),
        lambda: make_schedule("cosine", 0.01, 10, pct_start=0.3),  # not a cosine parameter
    ],
)
def test_invalid_values_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_tf_twin_matches_at_float32_precision_in_the_cosine_tail():
    # The tail of a long cosine is ~1e-9 * base_lr: float32 arithmetic alone would be far off.
    total = 100_000
    schedule = LearningRateSchedule("cosine", 1.0, total)
    steps = np.arange(total - 10, total + 1)
    expected = [cosine(s, total, 1.0) for s in steps]
    assert 0 < expected[0] < 1e-7
    np.testing.assert_allclose(schedule(tf.constant(steps)).numpy(), expected, rtol=1e-5, atol=0)
    assert math.isclose(schedules.cosine(total, total, 1.0), 0.0, abs_tol=1e-15)
