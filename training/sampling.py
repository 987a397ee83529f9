"""Drawing K labeled examples per class: the few-label experiments' one sampler.

``hubflow-train --examples_per_class K --subsample_seed S`` and the audit's learning curve both
draw through :func:`per_class_indices`, so a curve's point at K is exactly what the trainer
trains on with the same K and seed.
"""

from __future__ import annotations

import numpy as np


class NotEnoughExamples(ValueError):
    """A class has fewer examples than the K asked for."""


def per_class_indices(labels, k: int, seed: int, *, strict: bool = True) -> np.ndarray:
    """Indices of ``k`` examples of every class present in ``labels``, drawn with ``seed``.

    Each class's examples are shuffled once by a generator seeded with ``(seed, class)``, and
    the first ``k`` are taken: the draw of one class does not depend on the others, the same
    seed always gives the same rows, and for one seed the draw at ``k`` is contained in the
    draw at any larger ``k`` (a learning curve adds labels rather than redrawing them).

    Args:
      labels: integer class index per example.
      k: examples per class, at least 1.
      seed: the draw's seed.
      strict: if True, a class with fewer than ``k`` examples raises
        :class:`NotEnoughExamples`; if False, it contributes all of its examples.

    Returns:
      Sorted indices into ``labels``.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    labels = np.asarray(labels).reshape(-1)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if strict and len(members) < k:
            raise NotEnoughExamples(
                f"class {int(cls)} has {len(members)} examples, fewer than the {k} asked for"
            )
        rng = np.random.default_rng([seed, int(cls)])
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
