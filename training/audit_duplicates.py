"""Near-duplicates: pairs of different files whose embeddings are nearly identical.

Exact copies never reach the audit (preprocessing keeps one record per sha256); this finds what
hashing cannot: the same photo resized, recompressed or slightly cropped. Two records are a pair
when the cosine of their z-scored embeddings (the audit classifier's input: each dimension
centred and scaled by the labeled records' mean and standard deviation) is at least the
threshold (:data:`DEFAULT_THRESHOLD`). Raw embeddings of a ReLU backbone are all positive, so
different photos of one domain sit close together in raw cosine (distinct MNIST digits: median
nearest-other raw cosine 0.94); z-scoring spreads them (0.66) while copies stay next to their
originals.

A pair whose records lie in two different labeled splits (train/eval/test) is **leakage**: the
model is evaluated on an image it was, in effect, trained on. Pairs with an unlabeled record are
reported too (labeling both would waste a label, or plant leakage) but are not leakage.

How it scales. The search here is exact: L2-normalised embeddings multiplied block by block
(:data:`BLOCK_ROWS` x :data:`BLOCK_ROWS` blocks, upper triangle only), keeping the entries above
the threshold. Time grows as N^2 D / 2 and memory stays one block (16 MB): 4,000 x 1,280 takes
well under a second, 10^5 about 6e12 multiply-adds (minutes on 2 cores). For 10^6-10^7:

* on one machine, an approximate-nearest-neighbour index: faiss (``IndexHNSWFlat`` with inner
  product on the normalised vectors, or ``IndexIVFPQ`` for memory) or ScaNN; query each image's
  k (e.g. 10) nearest neighbours and keep those above the threshold. Near-duplicates are each
  other's nearest neighbours, so a small k loses almost none;
* on Beam, by blocking: assign each embedding to buckets (random-hyperplane LSH signatures,
  several tables, or its nearest k-means centroids fitted on a sample), ``GroupByKey`` per
  bucket, run the exact blocked product inside each bucket and deduplicate the pairs; buckets
  bigger than a bound are split again.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Cosine of z-scored embeddings from which two records are near-duplicates. Calibrated on
# efficientnet_lite0 embeddings of all 2,398 photos of hymenoptera and cats-vs-dogs-2k and 840
# copies of 120 of them (benchmarks/audit.py --part calibrate; README "Audit your data"): at
# 0.80, 95 % of the copies are caught (every 0.75x resize and q70 recompression, 97 % of 0.5x
# resizes, 95 % of q30, 99 % of 5 % crops) and no pair of different photos is, but one true
# duplicate; the most similar different photos reach 0.75-0.78.
# Per built-in backbone, measured the same way (``--job_flag=--backbone=...``), since each
# backbone's z-scored embeddings spread photos differently. efficientnet_lite2 at 0.80 catches
# 90.5 % of the copies (100 % of 0.75x resizes and q70, 93 % of 0.5x, 90 % of q30, 99 % of
# crops) and pairs 4 different photos besides the true duplicate, all of same-breed animals in
# the same pose; 0.78 would catch 92.5 % with 8, 0.85 83 % with none. Those figures are for
# images squashed into the input (--crop_fraction 0); with the default centre crop (0.875) the
# same calibration gives 81.7 % at 0.80 with the same 4 different pairs (69 % of 0.5x resizes),
# 84.0 % with 12 at 0.78, 77.4 % with none at 0.82: 0.80 stays the best trade-off.
CALIBRATED_THRESHOLDS = {
    "efficientnet_lite0": 0.80,
    "efficientnet_lite2": 0.80,
}
# For a backbone never calibrated: Lite0's, with a warning (training.audit).
DEFAULT_THRESHOLD = CALIBRATED_THRESHOLDS["efficientnet_lite0"]
CALIBRATED = "calibrated"  # threshold_for's source of a calibrated threshold
UNCALIBRATED = "not calibrated for this backbone"
BLOCK_ROWS = 2048


def threshold_for(backbone: str) -> tuple[float, str]:
    """The near-duplicate threshold for ``backbone``'s embeddings (a manifest's backbone name),
    and :data:`CALIBRATED` or :data:`UNCALIBRATED`."""
    if backbone in CALIBRATED_THRESHOLDS:
        return CALIBRATED_THRESHOLDS[backbone], CALIBRATED
    return DEFAULT_THRESHOLD, UNCALIBRATED


def unit_rows(embeddings: np.ndarray, centre: np.ndarray | None) -> np.ndarray:
    """Rows minus ``centre`` (if given), scaled to unit length (a zero row stays zero)."""
    x = np.asarray(embeddings, np.float32)
    if centre is not None:
        x = x - np.asarray(centre, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Row pairs ``(a, b)`` with ``a < b`` and their cosine, unordered."""

    a: np.ndarray
    b: np.ndarray
    cosine: np.ndarray


def find(unit: np.ndarray, threshold: float, block_rows: int = BLOCK_ROWS) -> Pairs:
    """Every pair of rows of ``unit`` (unit vectors) whose dot product is >= ``threshold``."""
    n = len(unit)
    found_a, found_b, found_cos = [], [], []
    for row in range(0, n, block_rows):
        for col in range(row, n, block_rows):  # upper triangle of blocks
            sims = unit[row : row + block_rows] @ unit[col : col + block_rows].T
            rows, cols = np.nonzero(sims >= threshold)
            rows, cols = rows + row, cols + col
            keep = cols > rows  # each pair once, never a row with itself
            found_a.append(rows[keep])
            found_b.append(cols[keep])
            found_cos.append(sims[rows[keep] - row, cols[keep] - col])
    if not found_a:
        empty = np.zeros(0, np.int64)
        return Pairs(empty, empty, np.zeros(0, np.float32))
    return Pairs(
        np.concatenate(found_a).astype(np.int64),
        np.concatenate(found_b).astype(np.int64),
        np.concatenate(found_cos).astype(np.float32),
    )


def is_leakage(split_a: str, split_b: str, labeled_splits) -> bool:
    """Two different labeled splits."""
    return split_a != split_b and split_a in labeled_splits and split_b in labeled_splits


def ordered(pairs: Pairs, splits: np.ndarray, labeled_splits) -> tuple[np.ndarray, np.ndarray]:
    """The order to report pairs in (leakage first, then by cosine, highest first), and the
    leakage flag of each pair (in that order)."""
    leakage = np.asarray(
        [
            is_leakage(splits[a], splits[b], labeled_splits)
            for a, b in zip(pairs.a, pairs.b, strict=True)
        ],
        bool,
    )
    order = np.lexsort((pairs.b, pairs.a, -pairs.cosine, ~leakage))
    return order, leakage[order]
