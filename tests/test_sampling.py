"""The per-class sampler that --examples_per_class and the audit's learning curve share."""

import numpy as np
import pytest

from training.sampling import NotEnoughExamples, per_class_indices

LABELS = np.array([0] * 12 + [1] * 7 + [2] * 30)


def test_draws_exactly_k_of_every_class():
    chosen = per_class_indices(LABELS, 5, seed=3)
    assert np.bincount(LABELS[chosen]).tolist() == [5, 5, 5]
    assert len(set(chosen.tolist())) == len(chosen)


def test_same_seed_same_rows_other_seed_other_rows():
    first = per_class_indices(LABELS, 5, seed=3)
    np.testing.assert_array_equal(first, per_class_indices(LABELS, 5, seed=3))
    assert not np.array_equal(first, per_class_indices(LABELS, 5, seed=4))


def test_a_larger_k_adds_labels_to_the_smaller_draw():
    for small, large in ((1, 2), (2, 5), (5, 7)):
        assert set(per_class_indices(LABELS, small, 9)) <= set(per_class_indices(LABELS, large, 9))


def test_a_class_draw_does_not_depend_on_the_other_classes():
    only_class_2 = np.flatnonzero(LABELS == 2)
    drawn = per_class_indices(LABELS, 4, seed=1)
    alone = per_class_indices(LABELS[only_class_2], 4, seed=1)  # class 2 without the others
    np.testing.assert_array_equal(drawn[LABELS[drawn] == 2], only_class_2[alone])


def test_too_few_examples_names_the_class_unless_not_strict():
    with pytest.raises(NotEnoughExamples, match="class 1 has 7 examples"):
        per_class_indices(LABELS, 8, seed=0)
    chosen = per_class_indices(LABELS, 8, seed=0, strict=False)
    assert np.bincount(LABELS[chosen]).tolist() == [8, 7, 8]
