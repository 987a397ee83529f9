"""Label issues: labeled rows whose given label is likely wrong, most suspect first.

Confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in
Dataset Labels", JAIR 70, 2021), as implemented by ``cleanlab``:

1. out-of-fold predicted probabilities: stratified k-fold over the train and eval rows, each
   row predicted by the audit's light classifier (:mod:`training.audit_classifier`) fitted on
   the other folds;
2. ``cleanlab.filter.find_label_issues`` (``filter_by="prune_by_noise_rate"``) estimates the
   joint distribution of given and true labels from those probabilities and flags, per pair of
   labels, the rows most likely to carry the wrong one;
3. the flagged rows are ranked by ``self_confidence`` (the probability of the given label,
   lowest first).

The test split is not checked: its labels are what accuracy is measured against, and the
confusion gallery of the report shows its doubtful rows.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np

from training import audit_classifier

_LOGGER = logging.getLogger(__name__)

# 5 folds: with 5 % of the train labels flipped (10 seeded draws), 3, 5 and 10 folds put the
# same share of flips in the top 2N (N = flips) within noise on cats-vs-dogs-2k (0.92/0.91/0.94),
# hymenoptera (0.80/0.78/0.78) and 4,000 MNIST digits (0.88/0.89/0.88); 10 folds cost twice 5.
DEFAULT_FOLDS = 5
# Ranking of the flagged rows: on MNIST (10 classes) self_confidence put 84 % of the flips in
# its top N against 79 % for normalized_margin; on two classes the two orders are the same.
RANKED_BY = "self_confidence"
METHOD = (
    f"confident learning (cleanlab find_label_issues, prune_by_noise_rate, ranked by "
    f"{RANKED_BY}) on out-of-fold probabilities of a logistic regression on z-scored embeddings"
)


@dataclasses.dataclass(frozen=True)
class LabelIssues:
    """Flagged rows, most suspect first (indices into the rows that were checked).

    ``score`` is ``1 - p(given label)`` from the out-of-fold probabilities: 0 when the
    classifier is sure of the given label, 1 when it is sure of another; higher is more suspect.
    ``suggested`` is the most probable label other than the given one.
    """

    rows: np.ndarray
    score: np.ndarray
    suggested: np.ndarray
    checked: int
    method: str = METHOD


def find(
    x: np.ndarray, y: np.ndarray, num_classes: int, folds: int, seed: int
) -> tuple[LabelIssues, np.ndarray]:
    """Flags the rows of ``(x, y)`` whose label is likely wrong.

    Args:
      x: z-scored embeddings of the rows to check.
      y: their given labels.
      folds: k of the k-fold (:data:`DEFAULT_FOLDS`).
      seed: the folds' seed.

    Returns:
      The issues, and the out-of-fold probabilities ``[N, num_classes]``.
    """
    from cleanlab.filter import find_label_issues

    y = np.asarray(y, np.int64)
    probabilities = audit_classifier.out_of_fold_probabilities(x, y, num_classes, folds, seed)
    present = np.unique(y)
    if len(present) < 2 or len(y) < 2 * folds:
        empty = np.zeros(0, np.int64)
        return LabelIssues(empty, np.zeros(0), empty, len(y)), probabilities
    # cleanlab wants labels 0..K'-1 that all occur: restrict to the classes present.
    compact = np.searchsorted(present, y)
    probs = probabilities[:, present]
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flagged = np.asarray(
            find_label_issues(compact, probs, return_indices_ranked_by=RANKED_BY), np.int64
        )
    for message in {str(w.message) for w in caught}:  # e.g. a class with too few examples
        _LOGGER.warning("cleanlab: %s", message)
    score = 1.0 - probs[flagged, compact[flagged]]
    order = np.argsort(-score, kind="stable")  # cleanlab's order, ties as it left them
    flagged, score = flagged[order], score[order]
    others = probabilities[flagged].copy()
    others[np.arange(len(flagged)), y[flagged]] = -1.0
    issues = LabelIssues(rows=flagged, score=score, suggested=others.argmax(axis=1), checked=len(y))
    return issues, probabilities
