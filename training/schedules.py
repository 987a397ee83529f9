"""Learning-rate schedules: small pure functions, a registry, and a tf_keras schedule wrapper.

This module owns the schedules ``--lr_schedule`` can name. Each schedule is a pure function
``f(step, total_steps, base_lr, **params) -> float`` (as BiT's ``bit_hyperrule.get_lr``), easy to
test and to plot; :class:`LearningRateSchedule` computes the same numbers with TF ops for an
optimizer, and :func:`make_schedule` picks one by name.

Decisions:
  * Steps count optimizer updates from 0 (``optimizer.iterations``). Steps before 0 count as 0
    and steps past ``total_steps`` keep the last value, so a schedule never errors mid-training.
  * ``cosine`` warms up linearly from 0 (the first warm-up step runs at lr 0, as in BiT) and then
    decays to exactly 0 at ``total_steps``.
  * ``one-cycle`` follows PyTorch's ``OneCycleLR`` (cosine annealing, two phases) number for
    number: the peak is at step ``pct_start * total_steps - 1`` and the minimum at
    ``total_steps - 1``.
  * The TF version computes in float64 and returns float32, so it matches the pure function to
    float32 precision even where the value is tiny (the tail of a cosine).
  * ``constant`` resolves to a plain float, not a schedule object, so Keras callbacks that set the
    learning rate (``ReduceLROnPlateau``) keep working.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import tensorflow as tf
import tf_keras


def constant(step: float, total_steps: int, base_lr: float) -> float:
    """``base_lr`` at every step."""
    _check(total_steps, base_lr)
    return float(base_lr)


def cosine(step: float, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to 0.

    Args:
        step: The optimizer step (0-based).
        total_steps: Steps of training; the learning rate reaches 0 here.
        base_lr: Peak learning rate.
        warmup_steps: Length of the linear warm-up, in ``[0, total_steps)``.

    Returns:
        The learning rate at ``step``.
    """
    _check(total_steps, base_lr)
    _check_warmup(warmup_steps, total_steps)
    step = min(max(float(step), 0.0), float(total_steps))
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def one_cycle(
    step: float,
    total_steps: int,
    base_lr: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    """Smith's one-cycle policy with cosine annealing, as PyTorch ``OneCycleLR``.

    Rises from ``base_lr / div_factor`` to ``base_lr`` at step ``pct_start * total_steps - 1``,
    then falls to ``base_lr / (div_factor * final_div_factor)`` at step ``total_steps - 1``.

    Args:
        step: The optimizer step (0-based).
        total_steps: Steps of training.
        base_lr: Peak learning rate (PyTorch's ``max_lr``).
        pct_start: Fraction of the steps spent rising, in (0, 1).
        div_factor: The start value is ``base_lr / div_factor``.
        final_div_factor: The end value is the start value divided by this.

    Returns:
        The learning rate at ``step``.
    """
    _check(total_steps, base_lr)
    _check_one_cycle(pct_start, div_factor, final_div_factor)
    initial_lr = base_lr / div_factor
    min_lr = initial_lr / final_div_factor
    peak_step = pct_start * total_steps - 1.0
    end_step = total_steps - 1.0
    step = min(max(float(step), 0.0), end_step)
    if step <= peak_step:
        pct = step / peak_step if peak_step > 0 else 1.0
        return _anneal_cos(initial_lr, base_lr, pct)
    pct = (step - peak_step) / (end_step - peak_step)
    return _anneal_cos(base_lr, min_lr, pct)


def _anneal_cos(start: float, end: float, pct: float) -> float:
    """Cosine interpolation from ``start`` (pct 0) to ``end`` (pct 1)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "cosine": cosine,
    "one-cycle": one_cycle,
}


@tf_keras.saving.register_keras_serializable(package="hubflow")
class LearningRateSchedule(tf_keras.optimizers.schedules.LearningRateSchedule):
    """One of :data:`SCHEDULES` as a tf_keras schedule, computed with TF ops (graph-safe).

    ``schedule(step)`` equals ``SCHEDULES[name](step, total_steps, base_lr, **params)`` to float32
    precision, for a Python number or a (possibly symbolic) integer step tensor. Registered as
    ``hubflow>LearningRateSchedule``: its name is the tf_keras base class's, so without the
    registration a saved optimizer config would deserialise to the abstract base class.
    """

    def __init__(self, name: str, base_lr: float, total_steps: int, **params: Any) -> None:
        """Validates the schedule by evaluating the pure function once.

        Args:
            name: A key of :data:`SCHEDULES`.
            base_lr: Peak (or constant) learning rate.
            total_steps: Steps of training.
            **params: Extra arguments of the schedule, e.g. ``warmup_steps`` for ``cosine``.

        Raises:
            ValueError: For an unknown name or invalid values.
        """
        super().__init__()
        function = _lookup(name)
        try:
            function(0, total_steps, base_lr, **params)
        except TypeError as error:
            raise ValueError(f"Bad parameters for --lr_schedule {name!r}: {error}") from error
        self.name = name
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.params = dict(params)

    def __call__(self, step):
        with tf.name_scope(f"lr_{self.name.replace('-', '_')}"):
            step = tf.cast(step, tf.float64)
            if self.name == "constant":
                lr = tf.constant(self.base_lr, tf.float64) + 0.0 * step
            elif self.name == "cosine":
                lr = _cosine_tf(step, self.total_steps, self.base_lr, **self.params)
            else:
                lr = _one_cycle_tf(step, self.total_steps, self.base_lr, **self.params)
            return tf.cast(lr, tf.float32)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            **self.params,
        }


def make_schedule(
    name: str, base_lr: float, total_steps: int, **params: Any
) -> float | LearningRateSchedule:
    """The learning rate to give an optimizer for ``--lr_schedule name``.

    Args:
        name: A key of :data:`SCHEDULES`.
        base_lr: Peak (or constant) learning rate.
        total_steps: Steps of training.
        **params: Extra arguments of the schedule, e.g. ``warmup_steps`` for ``cosine``.

    Returns:
        ``base_lr`` itself for ``constant`` (so callbacks such as ``ReduceLROnPlateau`` can still
        change it), a :class:`LearningRateSchedule` otherwise.

    Raises:
        ValueError: For an unknown name or invalid values.
    """
    if _lookup(name) is constant:
        constant(0, total_steps, base_lr, **params)
        return float(base_lr)
    return LearningRateSchedule(name, base_lr, total_steps, **params)


def _lookup(name: str) -> Callable[..., float]:
    try:
        return SCHEDULES[name]
    except KeyError:
        choices = ", ".join(SCHEDULES)
        raise ValueError(f"Unknown --lr_schedule {name!r}; choose one of: {choices}.") from None


def _check(total_steps: int, base_lr: float) -> None:
    if total_steps < 1:
        raise ValueError(
            f"total_steps must be >= 1, got {total_steps}; check epochs and batch size"
        )
    if not base_lr > 0:
        raise ValueError(f"The base learning rate must be > 0, got {base_lr}")


def _check_warmup(warmup_steps: int, total_steps: int) -> None:
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}"
        )


def _check_one_cycle(pct_start: float, div_factor: float, final_div_factor: float) -> None:
    if not 0.0 < pct_start < 1.0:
        raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
    if not div_factor > 0 or not final_div_factor > 0:
        raise ValueError(
            f"div_factor and final_div_factor must be > 0, got {div_factor} and {final_div_factor}"
        )


def _cosine_tf(step: tf.Tensor, total_steps: int, base_lr: float, warmup_steps: int = 0):
    """TF twin of :func:`cosine`; ``step`` is float64."""
    step = tf.clip_by_value(step, 0.0, float(total_steps))
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    decay = 0.5 * base_lr * (1.0 + tf.cos(math.pi * progress))
    if warmup_steps == 0:
        return decay
    return tf.where(step < warmup_steps, base_lr * step / warmup_steps, decay)


def _one_cycle_tf(
    step: tf.Tensor,
    total_steps: int,
    base_lr: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
):
    """TF twin of :func:`one_cycle`; ``step`` is float64."""
    initial_lr = base_lr / div_factor
    min_lr = initial_lr / final_div_factor
    peak_step = pct_start * total_steps - 1.0
    end_step = total_steps - 1.0
    step = tf.clip_by_value(step, 0.0, end_step)
    rise_pct = step / peak_step if peak_step > 0 else tf.ones_like(step)
    fall_pct = (step - peak_step) / (end_step - peak_step)
    rise = _anneal_cos_tf(initial_lr, base_lr, rise_pct)
    fall = _anneal_cos_tf(base_lr, min_lr, fall_pct)
    return tf.where(step <= peak_step, rise, fall)


def _anneal_cos_tf(start: float, end: float, pct: tf.Tensor) -> tf.Tensor:
    return end + (start - end) / 2.0 * (tf.cos(math.pi * pct) + 1.0)
