"""Progress lines: a long run must report how far it is, how fast, and when it will end."""

from __future__ import annotations

import logging

from pipeline import progress


def test_progress_reports_count_rate_and_eta(caplog, monkeypatch):
    clock = iter([0.0, 1.0, 12.0, 13.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    p = progress.Progress("embedded images", interval=10.0)
    with caplog.at_level(logging.INFO, logger="pipeline.progress"):
        for _ in range(4):
            p.update(total=100)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("embedded images: started, 100 to do")
    # third update at t=12 s: 3 done in 12 s -> 0.25/s, 97 left -> 388 s
    assert lines[1].startswith("embedded images: 3 of 100 (3%), 0.2/s, ETA 6m28s")
    assert len(lines) == 2  # the fourth update is within the interval


def test_format_seconds():
    assert progress.format_seconds(5) == "5s"
    assert progress.format_seconds(65) == "1m05s"
    assert progress.format_seconds(3725) == "1h02m"
