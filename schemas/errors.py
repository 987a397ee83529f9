"""The error-record contract: what a rejected input row becomes, and the words used to say why.

Every job writes one JSON object per rejected row to ``errors-*.jsonl`` with the fields of
:class:`ErrorRecord`. ``stage`` says which step rejected the row and ``category`` is a short
machine-readable reason; both come from the tables below and nowhere else, so a user can count
and filter them, and the manifest's ``rejected_by_reason`` and the Beam counters
(``rows_rejected_<category>``) use the same words.
"""

from __future__ import annotations

from typing import NamedTuple

# Stages: where a row was rejected.
STAGE_PARSE = "parse"  # reading the CSV / listing the image dir
STAGE_READ = "read"  # reading the image file
STAGE_DECODE = "decode"  # decoding / validating the image
STAGE_DEDUPE = "dedupe"  # resolving rows with identical image content
STAGE_EMBED = "embed"  # the backbone
STAGE_PREDICT = "predict"  # batch prediction's model call
STAGES = (STAGE_PARSE, STAGE_READ, STAGE_DECODE, STAGE_DEDUPE, STAGE_EMBED, STAGE_PREDICT)

# Categories: why a row was rejected.
BAD_ROW = "bad_row"  # malformed CSV row / misplaced file in an image dir
UNKNOWN_LABEL = "unknown_label"  # label not in --label_dict
UNREADABLE = "unreadable"  # the file (or the CSV) cannot be read
FILE_CHANGED = "file_changed"  # the image changed between two reads of one job
EMPTY_FILE = "empty_file"  # zero-byte image
UNDECODABLE = "undecodable"  # corrupt, truncated or unsupported image data
TOO_LARGE = "too_large"  # more pixels than --max_image_pixels (decompression bomb)
CONFLICTING_LABELS = "conflicting_labels"  # identical images with different labels
EMBED_FAILED = "embed_failed"  # the backbone failed or returned non-finite features
MODEL_FAILED = "model_failed"  # the exported model rejected the image
CATEGORIES = (
    BAD_ROW,
    UNKNOWN_LABEL,
    UNREADABLE,
    FILE_CHANGED,
    EMPTY_FILE,
    UNDECODABLE,
    TOO_LARGE,
    CONFLICTING_LABELS,
    EMBED_FAILED,
    MODEL_FAILED,
)


class ErrorRecord(NamedTuple):
    """A rejected row, written as one JSON object to ``errors-*.jsonl``.

    Attributes:
      csv: the source CSV (or image dir, or input pattern).
      line: line number in ``csv`` (0 when not applicable).
      row: the row text as written.
      uri: the image URI (resolved), or "" when the row had none.
      stage: one of :data:`STAGES`.
      reason: a readable explanation.
      category: one of :data:`CATEGORIES`.
    """

    csv: str
    line: int
    row: str
    uri: str
    stage: str
    reason: str
    category: str

    @classmethod
    def for_row(cls, row, stage: str, category: str, reason: str) -> ErrorRecord:
        """The error record of an input row (anything with ``source, line, row, uri``)."""
        return cls(row.source, row.line, row.row, row.uri, stage, reason, category)


ERROR_FIELDS = ErrorRecord._fields


def exception_reason(e: BaseException) -> str:
    """An exception as one line for an error record's ``reason``: ``Type: message``."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
