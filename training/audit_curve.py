"""The learning curve: held-out accuracy against labels per class, and a one-line reading.

At each k of 1, 2, 5, 10, 20, 50, ... (below the largest class's train count), the audit's light
classifier is fitted on k train rows per class, drawn by :func:`training.sampling.per_class_indices`
with seeds ``seed, seed + 1, ...`` (one per draw; a class with fewer than k rows gives all of
them), and scored on the test split. So the point at k, draw d, is what
``hubflow-train --examples_per_class k --subsample_seed <seed + d>`` trains on. The last point
is all train rows (one fit: every draw would be the same).

The reading compares the full-data accuracy with the accuracy at half the labels per class or
fewer (the largest such k): a gain of :data:`RISING_POINTS` or more is "still rising";
otherwise the curve is flat from the smallest k whose mean accuracy is within
:data:`RISING_POINTS` of full data.
"""

from __future__ import annotations

import numpy as np

from training import audit_classifier, sampling

# Draws per point. Over 10 seeded draws (benchmarks/audit.py --part curve) the accuracy at
# k = 1 spread with a std of 5-13 points, at k >= 50 of 0.3-1.6 points, on cats-vs-dogs-2k,
# hymenoptera and MNIST. 5 draws leave a standard error of the mean of 2-6 points at k = 1 and
# at most 0.7 at k >= 50, where the reading looks, for half the cost of 10.
DEFAULT_DRAWS = 5
# Accuracy gain (fraction) from half the labels to all that counts as "still rising": above the
# 0.7-point standard error of a 5-draw mean at the top of the measured curves.
RISING_POINTS = 0.01


def k_values(largest_class: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... below ``largest_class``, then ``largest_class`` (all)."""
    ks, base = [], 1
    while True:
        for step in (1, 2, 5):
            k = step * base
            if k >= largest_class:
                return ks + [largest_class]
            ks.append(k)
        base *= 10


def _point(k: int, accuracies: list[float], seeds: list[int], examples: list[int]) -> dict:
    values = np.asarray(accuracies, np.float64)
    return {
        "k": int(k),
        "mean": round(float(values.mean()), 4),
        "std": round(float(values.std()), 4),
        "min": round(float(values.min()), 4),
        "max": round(float(values.max()), 4),
        "accuracies": [round(float(a), 4) for a in values],
        "seeds": seeds,
        "examples": int(round(float(np.mean(examples)))),
    }


def learning_curve(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    draws: int,
    seed: int,
) -> list[dict]:
    """The curve's points: ``k``, ``mean``, ``std``, ``min``, ``max``, ``accuracies``,
    ``seeds`` (each draw's ``--subsample_seed``) and ``examples`` (train rows used, mean)."""
    y_train = np.asarray(y_train, np.int64)
    largest = int(np.bincount(y_train).max())
    points = []
    for k in k_values(largest):
        seeds = [seed] if k == largest else [seed + d for d in range(draws)]
        accuracies, examples = [], []
        for draw_seed in seeds:
            rows = sampling.per_class_indices(y_train, k, draw_seed, strict=False)
            model = audit_classifier.Classifier(num_classes, seed=draw_seed)
            model.fit(x_train[rows], y_train[rows])
            predicted = model.predict_proba(x_test).argmax(axis=1)
            accuracies.append(float(np.mean(predicted == y_test)))
            examples.append(len(rows))
        points.append(_point(k, accuracies, seeds, examples))
    return points


def reading(points: list[dict]) -> str:
    """One line saying whether more labels would likely help (see the module docstring)."""
    if len(points) < 2:
        return "too few labels per class for a curve: label more images"
    full = points[-1]
    before = [p for p in points[:-1] if p["k"] <= full["k"] / 2] or points[:1]
    gain = full["mean"] - before[-1]["mean"]
    if gain >= RISING_POINTS:
        return (
            f"accuracy is still rising at full data (+{100 * gain:.1f} points from "
            f"{before[-1]['k']} to {full['k']} per class): more labels will likely help"
        )
    flat_from = next(p for p in points if p["mean"] >= full["mean"] - RISING_POINTS)
    return (
        f"flat beyond {flat_from['k']} per class (within {100 * RISING_POINTS:.0f} point of the "
        f"{full['mean']:.3f} at {full['k']} per class): more labels like these will likely "
        "help little"
    )
