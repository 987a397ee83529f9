"""The label-CSV format and the split names.

A label CSV holds rows ``image_uri,label``. An optional header row names the columns; with a
header, a third column ``split`` may pin a row to one split, overriding the hashed assignment.
"""

from __future__ import annotations

URI_COLUMN = "image_uri"
LABEL_COLUMN = "label"
SPLIT_COLUMN = "split"
COLUMNS = (URI_COLUMN, LABEL_COLUMN, SPLIT_COLUMN)

TRAIN = "train"
EVAL = "eval"
TEST = "test"
SPLITS = (TRAIN, EVAL, TEST)
