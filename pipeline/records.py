"""Element types that flow through the preprocessing pipeline.

Plain NamedTuples: cheap to pickle, readable in test assertions, and ``_asdict()`` gives the
JSON written to ``errors-*.jsonl``.
"""

from __future__ import annotations

from typing import NamedTuple


class Row(NamedTuple):
    """One accepted data row of a label CSV (or one file of an ``--image_dir``).

    Attributes:
      source: the CSV (or image dir) the row came from.
      line: 1-based line number of the row in ``source`` (0 for image-dir files).
      row: the row's text as written (for error reports).
      uri: the image URI, resolved to an absolute path/URL.
      label: the label string (stripped).
      split: a split forced by the CSV's ``split`` column, or None for the hashed split.
    """

    source: str
    line: int
    row: str
    uri: str
    label: str
    split: str | None = None


class ErrorRecord(NamedTuple):
    """A rejected row, written as one JSON object to ``errors-*.jsonl``.

    Attributes:
      csv: the source CSV (or image dir).
      line: line number in ``csv`` (0 when not applicable).
      row: the row text as written.
      uri: the image URI (resolved), or "" when the row had none.
      stage: pipeline stage that rejected it: parse, read, decode, dedupe, embed.
      reason: a readable explanation.
      category: a short machine-readable reason, also the name of its Beam counter.
    """

    csv: str
    line: int
    row: str
    uri: str
    stage: str
    reason: str
    category: str

    @classmethod
    def for_row(cls, row: Row, stage: str, category: str, reason: str) -> ErrorRecord:
        return cls(row.source, row.line, row.row, row.uri, stage, reason, category)
