"""Element types that flow through the Beam jobs, and the dead-letter plumbing they share.

Plain NamedTuples: cheap to pickle and readable in test assertions. A rejected row becomes a
:class:`schemas.errors.ErrorRecord` on the ``errors`` output (:func:`reject`), counted under
``rows_rejected_<category>``; :func:`error_to_json` is the line written to ``errors-*.jsonl``.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from schemas.errors import ErrorRecord

METRICS_NAMESPACE = "hubflow"
# The tag of every DoFn's dead-letter output.
ERRORS = "errors"

# Kinds of input source, the first item of a ``(kind, path)`` source element.
SOURCE_CSV = "csv"  # a label CSV
SOURCE_IMAGE_DIR = "image_dir"  # a folder with one sub-folder per class
SOURCE_PATTERN = "pattern"  # a glob of images (batch prediction)


class Row(NamedTuple):
    """One accepted data row of a label CSV (or one file of an ``--image_dir``).

    Attributes:
      source: the CSV (or image dir) the row came from.
      line: 1-based line number of the row in ``source`` (0 for image-dir files).
      row: the row's text as written (for error reports).
      uri: the image URI, resolved to an absolute path/URL.
      label: the label string (stripped); "" for an unlabeled image (a blank label cell).
      split: a split forced by the CSV's ``split`` column, or None for the hashed split.
    """

    source: str
    line: int
    row: str
    uri: str
    label: str
    split: str | None = None

    @property
    def unlabeled(self) -> bool:
        """The row's label cell was blank: the image goes to the unlabeled split."""
        return not self.label


def counter(name: str):
    """A Beam counter in hubflow's namespace."""
    return beam.metrics.Metrics.counter(METRICS_NAMESPACE, name)


def reject(error: ErrorRecord) -> TaggedOutput:
    """Counts a rejected row under its category and tags it for the ``errors`` output."""
    counter(f"rows_rejected_{error.category}").inc()
    return TaggedOutput(ERRORS, error)


def error_to_json(error: ErrorRecord) -> str:
    """One line of ``errors-*.jsonl``."""
    return json.dumps(error._asdict(), ensure_ascii=False, sort_keys=False)
