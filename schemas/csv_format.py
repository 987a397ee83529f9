"""The label-CSV format and the split names.

A label CSV holds rows ``image_uri,label``. An optional header row names the columns; with a
header, a third column ``split`` may pin a row to one split, overriding the hashed assignment.

A row whose label is blank is an unlabeled image: it goes to the ``unlabeled`` split, with its
embedding and no label (``features.UNLABELED_INDEX``), for the audit to rank what to label next.
"""

from __future__ import annotations

URI_COLUMN = "image_uri"
LABEL_COLUMN = "label"
SPLIT_COLUMN = "split"
COLUMNS = (URI_COLUMN, LABEL_COLUMN, SPLIT_COLUMN)

TRAIN = "train"
EVAL = "eval"
TEST = "test"
# The labeled splits: what the trainer reads and a CSV's split column may name.
SPLITS = (TRAIN, EVAL, TEST)
# Rows with a blank label; never trained on, never pinned by the split column.
UNLABELED = "unlabeled"
ALL_SPLITS = SPLITS + (UNLABELED,)
