"""What to label next: unlabeled images chosen for uncertainty and diversity.

The audit's light classifier, fitted on every labeled train and eval row, predicts each
unlabeled image. Its uncertainty is ``1 - (p1 - p2)``, one minus the margin between the two most
probable labels: 1 when the classifier cannot tell them apart, 0 when it is sure.

The images are chosen by uncertainty-weighted k-means (Zhdanov, "Diverse mini-batch Active
Learning", 2019): the unlabeled pool's z-scored embeddings are clustered into ``budget``
clusters, each image weighted by the square root of its uncertainty, and from each cluster the
image nearest its centre is taken. Clusters spread the picks over the pool (no two near-copies,
every kind of image represented); the weights pull the centres towards what the classifier is
unsure of. The picks are listed most uncertain first.

Why this and not uncertainty alone: simulated on cats-vs-dogs-2k, hymenoptera and MNIST
(benchmarks/audit.py --part select: start from 2 or 10 labels per class, label 20 or 50 more,
refit, test; 5 seeds), picking the smallest margins was 31-34 points *worse* than random picks
on cats-vs-dogs from 2 labels per class, while this method stayed within 2 points of random in
every setting (-1.9 to +7.5; best on MNIST from 2 labels per class). In exploratory runs of the same protocol, weights of plain uncertainty
lost up to 7 points to random and a pre-filter to the 3-10 x budget most uncertain images (as
in the paper) up to 31, both from 2 labels per class.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from threadpoolctl import threadpool_limits

from training.audit_classifier import BLAS_THREADS

# Rows of to_label.csv: a person checks 50 thumbnails in a few minutes (a judgement, not a
# measurement); from 2 labels per class, 50 chosen images gave 0.4-2.9 points more test
# accuracy than 50 random ones on cats-vs-dogs and MNIST, and 1.3 points less on hymenoptera.
DEFAULT_BUDGET = 50


@dataclasses.dataclass(frozen=True)
class Selection:
    """Chosen rows (indices into the candidates), most uncertain first, with their
    uncertainty, margin and predicted label."""

    rows: np.ndarray
    uncertainty: np.ndarray
    margin: np.ndarray
    predicted: np.ndarray


def margins(probabilities: np.ndarray) -> np.ndarray:
    """``p1 - p2`` per row: the gap between the two most probable labels."""
    top = np.sort(probabilities, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


def select(probabilities: np.ndarray, x: np.ndarray, budget: int, seed: int = 0) -> Selection:
    """Picks up to ``budget`` rows (see the module docstring).

    Args:
      probabilities: ``[N, C]`` predicted probabilities of the candidates.
      x: ``[N, D]`` their z-scored embeddings.
      budget: how many to pick.
      seed: the k-means initialisation's seed.
    """
    n = len(probabilities)
    margin = margins(probabilities) if n else np.zeros(0)
    uncertainty = 1.0 - margin
    if n <= budget:
        chosen = np.arange(n)
    else:
        chosen = _cluster_representatives(x, np.sqrt(uncertainty), budget, seed)
    chosen = chosen[np.argsort(-uncertainty[chosen], kind="stable")]
    return Selection(
        rows=chosen,
        uncertainty=uncertainty[chosen],
        margin=margin[chosen],
        predicted=probabilities[chosen].argmax(axis=1) if n else chosen,
    )


def _cluster_representatives(x: np.ndarray, weight: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The row nearest each centre of a weighted k-means with ``k`` clusters."""
    from sklearn.cluster import KMeans

    x = np.asarray(x, np.float64)
    with threadpool_limits(BLAS_THREADS):
        kmeans = KMeans(n_clusters=k, n_init=1, random_state=seed)
        cluster = kmeans.fit_predict(x, sample_weight=np.maximum(weight, 1e-6))
    chosen = []
    for c, centre in enumerate(kmeans.cluster_centers_):
        members = np.flatnonzero(cluster == c)
        if len(members):
            chosen.append(members[np.argmin(((x[members] - centre) ** 2).sum(axis=1))])
    return np.asarray(chosen, np.int64)
