"""The audit's light classifier: multinomial logistic regression on z-scored embeddings.

Every analysis of the audit that needs predictions (out-of-fold probabilities for label issues,
the learning curve, the confusion gallery, what to label next) fits this one model, so they all
agree. It stands in for the trainer's default head (dropout -> softmax on the z-scored
embedding, Adam, early stopping on eval loss), which it matches in test accuracy while fitting
in under a second on a few thousand examples and needing no eval split to stop early; see
:data:`DEFAULT_C` for the figures and how its one setting was chosen.

The z-score uses the mean and standard deviation of the labeled records, as the statistics
tf.Transform writes at preprocessing (and the trainer bakes into its model) do.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

# Inverse L2 strength of the logistic regression (scikit-learn's ``C``) on z-scored embeddings:
# among 0.01-1, it gave the lowest 5-fold out-of-fold log loss (the calibrated probabilities
# confident learning needs) on the train+eval rows of all three sets measured with
# efficientnet_lite0 (benchmarks/audit.py --part choices): cats-vs-dogs-2k 0.033, hymenoptera
# 0.145, 4,000 MNIST digits 0.149. Its test accuracy there, 0.987 / 0.941 / 0.963, is that of
# hubflow-train's default head on the same data dirs (0.988 / 0.922 / 0.963), which took
# 23-74 s per fit against 0.01-0.6 s.
DEFAULT_C = 0.1
MAX_ITER = 500
# BLAS/OpenMP threads while fitting. lbfgs on a few thousand rows makes many small matrix
# products, which more threads only slow down: on the 2-core development VM, 3,200 MNIST rows
# x 1280 dims x 10 classes fit in 0.97 s with 1 thread and 22.6 s with 2 (shared machine).
BLAS_THREADS = 1


@dataclasses.dataclass(frozen=True)
class Standardizer:
    """Per-dimension z-score ``(x - mean) / std``; a constant dimension is left centred."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        x = np.asarray(x, np.float64)
        std = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(std > 0, std, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.std).astype(np.float32)


class Classifier:
    """Logistic regression over ``num_classes`` classes, some possibly absent from a fit.

    ``predict_proba`` always returns ``num_classes`` columns in label-index order (a class with
    no training example gets probability 0), so folds and small draws line up.
    """

    def __init__(self, num_classes: int, c: float = DEFAULT_C, seed: int = 0):
        self.num_classes = num_classes
        self.c = c
        self.seed = seed
        self._model = None
        self._classes = np.zeros(0, np.int64)

    def fit(self, x: np.ndarray, y: np.ndarray) -> Classifier:
        """Fits on z-scored ``x`` [N, D] and integer labels ``y`` [N]."""
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y, np.int64)
        self._classes = np.unique(y)
        if len(self._classes) < 2:  # one class: it is always the prediction
            self._model = None
            return self
        self._model = LogisticRegression(C=self.c, max_iter=MAX_ITER, random_state=self.seed)
        with warnings.catch_warnings(), threadpool_limits(BLAS_THREADS):
            # Not converging to 1e-4 in MAX_ITER steps changes no prediction that matters here.
            warnings.filterwarnings("ignore", message=".*(converge|ITERATIONS).*")
            self._model.fit(x, y)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``[N, num_classes]`` probabilities."""
        out = np.zeros((len(x), self.num_classes), np.float64)
        if self._model is None:
            out[:, self._classes[0]] = 1.0
        else:
            with threadpool_limits(BLAS_THREADS):
                out[:, self._classes] = self._model.predict_proba(x)
        return out


def out_of_fold_probabilities(
    x: np.ndarray, y: np.ndarray, num_classes: int, folds: int, seed: int, c: float = DEFAULT_C
) -> np.ndarray:
    """Probabilities of each row from a classifier that did not see it (stratified k-fold).

    A class with fewer rows than ``folds`` is spread over as many folds as it has rows, so
    every row is still predicted by a model fitted without it.

    Returns:
      ``[N, num_classes]`` probabilities, row-aligned with ``x``.
    """
    y = np.asarray(y, np.int64)
    fold_of = np.zeros(len(y), np.int64)
    rng = np.random.default_rng(seed)
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        fold_of[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    probabilities = np.zeros((len(y), num_classes), np.float64)
    for fold in range(folds):
        held = fold_of == fold
        if not held.any():
            continue
        model = Classifier(num_classes, c, seed).fit(x[~held], y[~held])
        probabilities[held] = model.predict_proba(x[held])
    return probabilities
