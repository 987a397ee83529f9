"""The report pages a person opens in a browser: the audit's and the trainer's ``report.html``.

Each page is one static HTML5 file with its CSS inline and no JavaScript. Thumbnails and plots
are separate files linked by paths relative to the page (``thumbs/<sha256>.jpg``,
``training_curves.png``), so the folder opens offline, from disk or from any static server. A
Content-Security-Policy in the page lets it load nothing but those images and its own CSS.

Every string taken from the data (file names, labels, readings) is HTML-escaped, and every
link is percent-encoded as a relative path: a file name such as ``<script>.jpg`` is shown as
text, and a link cannot point outside the folder or run script. Long lists are cut at
:data:`MAX_ROWS` on the page; the CSV files linked from it hold every row.

TensorFlow-free: the standard library, and Pillow for thumbnails.
"""

from __future__ import annotations

import html
import io
import json
import math
import posixpath
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image, ImageOps

from schemas import csv_format

REPORT_FILE = "report.html"  # the page's name, in the audit's output dir and in --model_dir
THUMB_SIDE = 160  # pixels: the longer side of a thumbnail
THUMB_QUALITY = 85
MAX_ROWS = 50  # rows of one list shown on a page (label issues, pairs, to-label)

# Images from the page's folder (and data: URLs), inline CSS, nothing else: no script, no
# network. ``file:`` is listed because a page opened from disk has no origin of its own.
_CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'"

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d8dee4; --soft: #f6f8fa; --accent: #0969da;
  --bad: #cf222e; --bad-soft: #ffebe9; --good: #1a7f37; --good-soft: #dafbe1; }
* { box-sizing: border-box; }
[id] { scroll-margin-top: 56px; }
body { margin: 0; background: var(--soft); color: var(--fg);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
header.top { background: #fff; border-bottom: 1px solid var(--line); padding: 20px 0 12px; }
.wrap { max-width: 1200px; margin: 0 auto; padding: 0 28px; }
h1 { font-size: 24px; margin: 0 0 4px; font-weight: 600; }
h2 { font-size: 18px; margin: 0 0 12px; font-weight: 600; }
h3 { font-size: 15px; margin: 18px 0 8px; font-weight: 600; }
p { margin: 6px 0 10px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
.muted { color: var(--muted); }
.small { font-size: 12px; }
.meta { color: var(--muted); margin: 0; overflow-wrap: anywhere; }
nav.sections { position: sticky; top: 0; z-index: 1; background: #fff;
  border-bottom: 1px solid var(--line); }
nav.sections .wrap { display: flex; flex-wrap: wrap; gap: 4px 18px; padding-top: 8px;
  padding-bottom: 8px; }
main { padding-bottom: 40px; }
section.card { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 18px 22px; margin: 18px 0; }
.stats { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0 0; }
.stat { background: var(--soft); border: 1px solid var(--line); border-radius: 8px;
  padding: 8px 14px; min-width: 150px; }
.stat b { display: block; font-size: 20px; font-weight: 600; }
.stat span { color: var(--muted); font-size: 12px; }
.reading { font-size: 15px; font-weight: 600; margin: 0 0 10px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 4px 0 8px; }
th, td { padding: 4px 12px; border-bottom: 1px solid #eaeef2; text-align: right;
  vertical-align: top; }
th { font-weight: 600; background: var(--soft); }
th:first-child, td:first-child { text-align: left; }
td.text, th.text { text-align: left; overflow-wrap: anywhere; }
tr.total td { font-weight: 600; border-top: 1px solid var(--line); }
.tables { display: flex; flex-wrap: wrap; gap: 8px 40px; align-items: flex-start; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px;
  background: #fff; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.plots figure { margin: 0; }
table.cm th.corner { background: #fff; color: var(--muted); font-weight: 400; font-size: 12px; }
table.cm td { text-align: center; min-width: 52px; border: 1px solid #fff; }
table.cm td a { display: block; font-weight: 600; }
table.cm th.col { writing-mode: horizontal-tb; max-width: 120px; overflow-wrap: anywhere;
  text-align: center; }
.thumb { width: 112px; height: 112px; object-fit: contain; background: #eef1f4;
  border-radius: 6px; display: block; }
.thumb.none { display: flex; align-items: center; justify-content: center; color: var(--muted);
  font-size: 11px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(132px, 1fr));
  gap: 14px; }
.gallery figure { margin: 0; }
.gallery figcaption { font-size: 12px; line-height: 1.35; margin-top: 4px;
  overflow-wrap: anywhere; }
.name { font-weight: 600; overflow-wrap: anywhere; }
section.cell { border-top: 1px solid var(--line); margin-top: 18px; padding-top: 4px; }
.columns { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
.columns > section.card { margin: 0; min-width: 0; }
@media (max-width: 960px) { .columns { grid-template-columns: 1fr; } }
ol.items { list-style: none; padding: 0; margin: 0; }
ol.items > li { display: flex; gap: 12px; padding: 10px 0; border-bottom: 1px solid #eaeef2;
  align-items: flex-start; }
ol.items > li:last-child { border-bottom: 0; }
.item-text { min-width: 0; font-size: 13px; }
.pair { display: flex; gap: 8px; }
.pair figure { margin: 0; width: 112px; }
.pair figcaption { font-size: 11px; overflow-wrap: anywhere; line-height: 1.3; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; border-radius: 10px;
  padding: 0 8px; border: 1px solid var(--line); background: var(--soft); }
.badge.leak { background: var(--bad-soft); color: var(--bad); border-color: #ffaba8; }
.arrow { color: var(--muted); }
ul.files { padding-left: 18px; margin: 0 0 8px; }
.options { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr));
  gap: 2px 18px; font-size: 13px; }
.options div { border-bottom: 1px solid #eaeef2; padding: 2px 0; overflow-wrap: anywhere; }
.options span { color: var(--muted); }
.side { display: flex; flex-wrap: wrap; gap: 12px 32px; align-items: flex-start; }
.side img.plot { max-width: 460px; }
dl.card { display: grid; grid-template-columns: 170px 1fr; gap: 10px 18px; margin: 0; }
dl.card dt { font-weight: 600; }
dl.card dd { margin: 0; }
dl.card ul { margin: 0; padding-left: 18px; }
footer { color: var(--muted); font-size: 12px; padding: 8px 0 24px; }
"""


# --- thumbnails ---------------------------------------------------------------------------------


def thumbnail_jpeg(data: bytes, side: int = THUMB_SIDE) -> bytes:
    """A JPEG thumbnail of an image, its longer side at most ``side`` pixels.

    EXIF orientation is applied and any mode is converted to RGB. JPEGs are decoded at a reduced
    DCT scale (``draft``), so a large photo costs little.

    Raises:
      OSError: ``data`` is not an image Pillow can decode (``PIL.UnidentifiedImageError``).
    """
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (side, side))
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=THUMB_QUALITY, optimize=True)
    return out.getvalue()


# --- small pieces -------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """Text for HTML content or a double-quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _href(path: Any) -> str:
    """A relative link to a file beside the page, percent-encoded and escaped.

    Everything but ``/`` is encoded, so ``javascript:`` or ``https://`` cannot become a scheme,
    and ``#`` or ``?`` in a file name stay part of it.
    """
    return _e(urllib.parse.quote(str(path), safe="/"))


def _number(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, bool):
        return "–"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _e(value)
    if math.isnan(number):
        return "–"
    return f"{number:.{digits}f}"


def _percent(value: Any, digits: int = 1) -> str:
    if value is None or isinstance(value, bool):
        return "–"
    try:
        return f"{100.0 * float(value):.{digits}f}%"
    except (TypeError, ValueError):
        return _e(value)


def _count(value: Any) -> str:
    if value is None:
        return "–"
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return _e(value)


def _file_name(uri: Any) -> str:
    """The file name of a URI with its folder, often the label's (``gs://b/cat/1.jpg`` ->
    ``cat/1.jpg``); just the name where the folder is a bucket or the root."""
    text = "" if uri is None else str(uri)
    scheme, _, path = text.rpartition("://")
    folder, name = posixpath.split(path.rstrip("/"))
    parent = posixpath.basename(folder)
    if not name:
        return text
    if not parent or (scheme and "/" not in folder):
        return name
    return f"{parent}/{name}"


def _thumb(src: Any, uri: Any) -> str:
    """A thumbnail linked relative to the page, or a placeholder when there is none."""
    if not src:
        return '<div class="thumb none">no image</div>'
    return f'<img class="thumb" src="{_href(src)}" alt="{_e(_file_name(uri))}">'


def _name(uri: Any) -> str:
    """A file name in bold, its whole URI as the tooltip."""
    return f'<span class="name" title="{_e(uri)}">{_e(_file_name(uri))}</span>'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], total: Sequence[str] = ()) -> str:
    """A table of already-escaped cells; the first column is left-aligned text."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if total:
        body += '<tr class="total">' + "".join(f"<td>{c}</td>" for c in total) + "</tr>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section class="card" id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _stat(value: str, what: str) -> str:
    return f'<div class="stat"><b>{value}</b><span>{_e(what)}</span></div>'


def _shown(shown: int, total: int, where: str | None) -> str:
    """The line under a list cut at ``shown`` rows, naming the file that holds them all."""
    if shown >= total:
        return ""
    tail = f', all in <a href="{_href(where)}">{_e(where)}</a>' if where else ""
    return f'<p class="muted small">Showing the first {shown} of {_count(total)}{tail}.</p>'


def _page(title: str, meta: Sequence[str], stats: Sequence[str], nav, sections) -> str:
    """The whole document: header with key numbers, section links, the sections."""
    links = "".join(f'<a href="#{anchor}">{_e(label)}</a>' for anchor, label in nav)
    meta_html = "".join(f'<p class="meta">{line}</p>' for line in meta)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>"
        f'<header class="top"><div class="wrap"><h1>{_e(title)}</h1>{meta_html}'
        f'<div class="stats">{"".join(stats)}</div></div></header>'
        f'<nav class="sections"><div class="wrap">{links}</div></nav>'
        f'<main class="wrap">{"".join(sections)}</main>'
        '<footer class="wrap">Written by hubflow. Static page: no script, nothing loaded from '
        "the network; images are files beside it.</footer></body></html>\n"
    )


def _splits_in_order(counts: Mapping[str, Any]) -> list[str]:
    known = [s for s in csv_format.ALL_SPLITS if s in counts]
    return known + sorted(s for s in counts if s not in known)


def _counts_table(counts: Mapping[str, Any], labels: Sequence[str]) -> str:
    """Images per label (rows) and split (columns), with totals."""
    splits = _splits_in_order(counts)
    if not splits:
        return '<p class="muted">No counts recorded.</p>'
    rows = []
    for label in labels:
        per_split = [((counts[s] or {}).get("labels") or {}).get(label) for s in splits]
        total = sum(n or 0 for n in per_split)
        rows.append([f"<span class='name'>{_e(label)}</span>", *map(_count, per_split)])
        rows[-1].append(_count(total))
    split_totals = [int((counts[s] or {}).get("count") or 0) for s in splits]
    total = ["total", *map(_count, split_totals), _count(sum(split_totals))]
    return _table(["label", *map(_e, splits), "all"], rows, total=total)


def _options(options: Mapping[str, Any]) -> str:
    """Options as compact ``name value`` pairs (values as in ``config.json``)."""
    pairs = "".join(
        f"<div><span>{_e(key)}</span> {_e(value if isinstance(value, str) else json.dumps(value))}"
        "</div>"
        for key, value in options.items()
    )
    return f'<div class="options">{pairs}</div>'


def _files_list(files: Mapping[str, Any]) -> str:
    if not files:
        return '<p class="muted">No files recorded.</p>'
    items = "".join(
        f'<li><a href="{_href(path)}">{_e(path)}</a> <span class="muted small">{_e(what)}'
        "</span></li>"
        for what, path in files.items()
        if path
    )
    return f'<ul class="files">{items}</ul>'


def _cell_anchor(i: int, j: int) -> str:
    # Indices, not label names: labels are user text and need not make valid, unique ids.
    return f"cell-{i}-{j}"


def _confusion(
    labels: Sequence[str],
    matrix: Sequence[Sequence[int]],
    galleries: Mapping[tuple[int, int], tuple[str, int]],
    anchor: str,
) -> tuple[str, str]:
    """The matrix as an HTML table, and the gallery sections its cells link to.

    Args:
      labels: C class names; rows are true labels, columns predicted ones.
      matrix: C x C counts.
      galleries: (true index, predicted index) -> (figures HTML, figures shown) for the cells
        that have images; those cells link to ``#cell-<i>-<j>``.
      anchor: the id of the section holding the table (the galleries link back to it).
    """
    n = len(labels)
    if n == 0 or len(matrix) != n or any(len(row) != n for row in matrix):
        return '<p class="muted">No confusion matrix.</p>', ""
    head = '<th class="corner">true ↓ · predicted →</th>' + "".join(
        f'<th class="col">{_e(label)}</th>' for label in labels
    )
    body = []
    for i, row in enumerate(matrix):
        total = sum(int(v) for v in row) or 1
        cells = []
        for j, value in enumerate(row):
            value = int(value)
            share = value / total
            colour = "26,127,55" if i == j else "207,34,46"
            alpha = 0.08 + 0.5 * share if value else 0.0
            style = f' style="background: rgba({colour},{alpha:.2f})"' if value else ""
            title = f"true {labels[i]}, predicted {labels[j]}: {value} ({share:.0%} of the row)"
            text = _count(value)
            if (i, j) in galleries:
                text = f'<a href="#{_cell_anchor(i, j)}">{text}</a>'
            cells.append(f'<td{style} title="{_e(title)}">{text}</td>')
        body.append(f'<tr><th class="text">{_e(labels[i])}</th>{"".join(cells)}</tr>')
    table = (
        f'<table class="cm"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )
    sections = []
    for (i, j), (figures, shown) in sorted(galleries.items()):
        count = int(matrix[i][j])
        cut = f" (first {shown} of {count})" if shown < count else ""
        sections.append(
            f'<section class="cell" id="{_cell_anchor(i, j)}"><h3>true <b>{_e(labels[i])}</b> '
            f'<span class="arrow">→</span> predicted <b>{_e(labels[j])}</b>: '
            f"{_count(count)} image{'s' if count != 1 else ''}{cut}</h3>"
            f'<div class="gallery">{figures}</div>'
            f'<p class="small"><a href="#{anchor}">↑ back to the matrix</a></p></section>'
        )
    return table, "".join(sections)


# --- the audit page -----------------------------------------------------------------------------


def _audit_data(audit: Mapping[str, Any]) -> str:
    counts = audit.get("counts") or {}
    rows = audit.get("rows") or {}
    reasons = audit.get("rejected_by_reason") or {}
    rows_table = _table(
        ["rows", "count"],
        [[_e(k), _count(rows.get(k))] for k in ("read", "written", "duplicates", "rejected")],
    )
    if reasons:
        ordered = sorted(reasons.items(), key=lambda item: (-int(item[1] or 0), str(item[0])))
        reasons_table = _table(
            ["rejected because", "rows"], [[_e(k), _count(v)] for k, v in ordered]
        )
    else:
        reasons_table = '<p class="muted">No row was rejected.</p>'
    return _section(
        "data",
        "Data",
        '<div class="tables"><div><h3>Images per split and label</h3>'
        + _counts_table(counts, audit.get("labels") or [])
        + "</div><div><h3>Input rows</h3>"
        + rows_table
        + "</div><div><h3>Rejected rows by reason</h3>"
        + reasons_table
        + "</div></div>",
    )


def _audit_learning_curve(curve: Mapping[str, Any]) -> str:
    points = curve.get("points") or []
    if not points and not curve.get("png"):
        return _section("learning-curve", "Learning curve", '<p class="muted">Not computed.</p>')
    body = ""
    if curve.get("reading"):
        body += f'<p class="reading">{_e(curve["reading"])}</p>'
    if curve.get("png"):
        body += (
            f'<img class="plot" src="{_href(curve["png"])}" '
            'alt="test accuracy against labeled images per class">'
        )
    rows = [
        [
            _count(p.get("k")),
            _count(len(p.get("accuracies") or [])),
            _percent(p.get("mean")),
            _percent(p.get("std")),
            _percent(p.get("min")),
            _percent(p.get("max")),
        ]
        for p in points
    ]
    if rows:
        body += "<h3>Test accuracy by labeled images per class</h3>" + _table(
            ["per class", "draws", "mean", "std", "min", "max"], rows
        )
    return _section("learning-curve", "Learning curve", body)


def _audit_confusion(confusion: Mapping[str, Any]) -> str:
    labels = [str(label) for label in confusion.get("labels") or []]
    matrix = confusion.get("matrix") or []
    cells = confusion.get("cells") or {}
    galleries = {}
    for i, true in enumerate(labels):
        for j, predicted in enumerate(labels):
            # Keys are "<true label>,<predicted label>"; looked up, never split (labels may
            # hold commas). "<i>,<j>" (indices) is accepted as well.
            items = cells.get(f"{true},{predicted}") or cells.get(f"{i},{j}") or []
            if not items:
                continue
            figures = "".join(
                f"<figure>{_thumb(item.get('thumb'), item.get('uri'))}<figcaption>"
                f"{_name(item.get('uri'))}<br>score {_number(item.get('score'))}</figcaption>"
                "</figure>"
                for item in items
            )
            galleries[(i, j)] = (figures, len(items))
    table, sections = _confusion(labels, matrix, galleries, "confusion")
    split = confusion.get("split") or "test"
    intro = (
        f"<p>{_e(split)} split, accuracy <b>{_percent(confusion.get('accuracy'))}</b>"
        + (f" ({_e(confusion['method'])})" if confusion.get("method") else "")
        + ". Rows are the given labels, columns the predicted ones; a number links to its "
        "images.</p>"
        if labels
        else ""
    )
    return _section("confusion", "Confusion matrix", intro + table + sections)


def _audit_label_issues(issues: Mapping[str, Any], csv_name: str | None) -> str:
    rows = list(issues.get("rows") or [])
    flagged = int(issues.get("flagged") or 0)
    intro = (
        f"<p><b>{_count(flagged)}</b> of {_count(issues.get('checked'))} labeled images "
        f"flagged by {_e(issues.get('method') or 'confident learning')}, most suspect first.</p>"
    )
    if not rows:
        return _section("label-issues", "Label issues", intro + "<p class='muted'>None.</p>")
    shown = rows[:MAX_ROWS]
    items = "".join(
        f"<li>{_thumb(r.get('thumb'), r.get('uri'))}<div class='item-text'>{_name(r.get('uri'))}"
        f"<br><span class='muted'>{_e(r.get('split'))}</span> · given <b>"
        f"{_e(r.get('given_label'))}</b> <span class='arrow'>→</span> suggested <b>"
        f"{_e(r.get('suggested_label'))}</b><br>score {_number(r.get('score'))}</div></li>"
        for r in shown
    )
    body = intro + f'<ol class="items">{items}</ol>' + _shown(len(shown), len(rows), csv_name)
    return _section("label-issues", "Label issues", body)


def _audit_near_duplicates(duplicates: Mapping[str, Any], csv_name: str | None) -> str:
    rows = list(duplicates.get("rows") or [])
    intro = (
        f"<p><b>{_count(duplicates.get('pairs'))}</b> pairs of different files with cosine "
        f"≥ {_number(duplicates.get('threshold'))}; <b>{_count(duplicates.get('leakage'))}</b> "
        "across splits (leakage), listed first.</p>"
    )
    if not rows:
        return _section("near-duplicates", "Near-duplicates", intro + "<p class='muted'>None.</p>")
    shown = rows[:MAX_ROWS]
    items = []
    for r in shown:
        badge = '<span class="badge leak">leakage</span> ' if r.get("leakage") else ""
        figures = "".join(
            f"<figure>{_thumb(r.get(f'thumb_{s}'), r.get(f'uri_{s}'))}<figcaption>"
            f"{_name(r.get(f'uri_{s}'))}<br><span class='muted'>{_e(r.get(f'split_{s}'))}"
            "</span></figcaption></figure>"
            for s in ("a", "b")
        )
        items.append(
            f'<li><div class="pair">{figures}</div><div class="item-text">{badge}cosine '
            f"<b>{_number(r.get('cosine'), 4)}</b><br><span class='muted'>"
            f"{_e(r.get('split_a'))} ↔ {_e(r.get('split_b'))}</span></div></li>"
        )
    body = (
        intro + f'<ol class="items">{"".join(items)}</ol>' + _shown(len(shown), len(rows), csv_name)
    )
    return _section("near-duplicates", "Near-duplicates", body)


def _audit_to_label(to_label: Mapping[str, Any] | None, csv_name: str | None) -> str:
    if not to_label:
        return _section(
            "to-label",
            "To label next",
            '<p class="muted">No unlabeled images. Rows of the label CSV with a blank label '
            "are kept as unlabeled images, and this list ranks which of them to label next.</p>",
        )
    rows = list(to_label.get("rows") or [])
    intro = (
        f"<p>The {_count(len(rows))} of {_count(to_label.get('unlabeled'))} unlabeled images to "
        f"label next (budget {_count(to_label.get('budget'))}): the current head is unsure of "
        "them and they cover the unlabeled images' variety. Check the predicted label, then add "
        "the rows to the label CSV.</p>"
    )
    shown = rows[: max(MAX_ROWS, int(to_label.get("budget") or 0))]
    figures = "".join(
        f"<figure>{_thumb(r.get('thumb'), r.get('uri'))}<figcaption>{n}. {_name(r.get('uri'))}"
        f"<br>predicted <b>{_e(r.get('predicted_label'))}</b><br>score "
        f"{_number(r.get('score'))}</figcaption></figure>"
        for n, r in enumerate(shown, 1)
    )
    body = intro + f'<div class="gallery">{figures}</div>' + _shown(len(shown), len(rows), csv_name)
    return _section("to-label", "To label next", body)


def _seconds_line(seconds: Mapping[str, Any]) -> str:
    if not seconds:
        return ""
    parts = ", ".join(f"{_e(step)} {_number(s, 1)} s" for step, s in seconds.items())
    return f'<p class="muted small">Time per step: {parts}.</p>'


def audit_page(audit: Mapping[str, Any]) -> str:
    """The audit's ``report.html``, from the dict the audit writes to ``audit.json``.

    Args:
      audit: ``{"data_dir", "created", "backbone", "labels", "counts": {split: {"count",
        "labels": {label: n}}}, "rows": {"read", "written", "duplicates", "rejected"},
        "rejected_by_reason": {reason: n}, "label_issues": {"flagged", "checked", "method",
        "rows": [{"uri", "split", "given_label", "suggested_label", "score", "thumb"}]},
        "near_duplicates": {"threshold", "pairs", "leakage", "rows": [{"uri_a", "uri_b",
        "split_a", "split_b", "cosine", "leakage", "thumb_a", "thumb_b"}]}, "learning_curve":
        {"points": [{"k", "mean", "std", "min", "max", "accuracies"}], "reading", "png"},
        "confusion": {"split", "labels", "matrix", "accuracy", "method" (optional: which
        model predicted), "cells": {"<true label>,<predicted label>": [{"uri", "thumb",
        "score"}]}}, "to_label": {"budget", "unlabeled", "rows":
        [{"uri", "predicted_label", "score", "thumb"}]}, "files": {what: file name},
        "seconds": {step: seconds}}``. ``thumb``, ``png`` and the files are paths relative to
        the page. Any section may be missing or empty (``to_label`` is absent when the data
        has no unlabeled images); the page then says so.

    Returns:
      The HTML document.
    """
    files = audit.get("files") or {}
    issues = audit.get("label_issues") or {}
    duplicates = audit.get("near_duplicates") or {}
    curve = audit.get("learning_curve") or {}
    written = (audit.get("rows") or {}).get("written")
    stats = [
        _stat(_count(written), "images written"),
        _stat(_count(issues.get("flagged")), "label issues"),
        _stat(_count(duplicates.get("pairs")), "near-duplicate pairs"),
        _stat(_count(duplicates.get("leakage")), "leaking across splits"),
        _stat(_percent((audit.get("confusion") or {}).get("accuracy")), "test accuracy"),
    ]
    meta = [
        f"data <b>{_e(audit.get('data_dir'))}</b> · backbone <b>{_e(audit.get('backbone'))}</b>",
        f"{_count(len(audit.get('labels') or []))} labels · written {_e(audit.get('created'))}",
    ]
    if curve.get("reading"):
        meta.append(f"Learning curve: {_e(curve['reading'])}")
    nav = [
        ("data", "Data"),
        ("learning-curve", "Learning curve"),
        ("confusion", "Confusion matrix"),
        ("issues", "Label issues & near-duplicates"),
        ("to-label", "To label next"),
        ("files", "Files"),
    ]
    side_by_side = (
        '<div class="columns" id="issues">'
        + _audit_label_issues(issues, files.get("label_issues"))
        + _audit_near_duplicates(duplicates, files.get("near_duplicates"))
        + "</div>"
    )
    sections = [
        _audit_data(audit),
        _audit_learning_curve(curve),
        _audit_confusion(audit.get("confusion") or {}),
        side_by_side,
        _audit_to_label(audit.get("to_label"), files.get("to_label")),
        _section("files", "Files", _files_list(files) + _seconds_line(audit.get("seconds") or {})),
    ]
    return _page("Data audit", meta, stats, nav, sections)


# --- the trainer's page -------------------------------------------------------------------------


def _model_metrics(metrics: Mapping[str, Any]) -> str:
    splits = [s for s in (csv_format.EVAL, csv_format.TEST) if metrics.get(s)]
    if not splits:
        return _section("metrics", "Metrics", '<p class="muted">No metrics.</p>')
    summary_rows = [
        [
            _e(split),
            _count(metrics[split].get("examples")),
            _percent(metrics[split].get("accuracy")),
            _percent(metrics[split].get("top_k_accuracy")),
            _number(metrics[split].get("loss")),
            _number(metrics[split].get("macro_f1")),
        ]
        for split in splits
    ]
    top_k = metrics[splits[-1]].get("k")
    summary = _table(
        ["split", "images", "accuracy", f"top-{_e(top_k)} accuracy", "loss", "macro F1"],
        summary_rows,
    )
    per_class = (metrics.get(csv_format.TEST) or {}).get("per_class") or {}
    class_rows = [
        [
            f"<span class='name'>{_e(label)}</span>",
            _number(m.get("precision")),
            _number(m.get("recall")),
            _number(m.get("f1")),
            _count(m.get("support")),
        ]
        for label, m in per_class.items()
    ]
    body = summary
    if class_rows:
        body += "<h3>Per class, test split</h3>" + _table(
            ["label", "precision", "recall", "F1", "images"], class_rows
        )
    return _section("metrics", "Metrics", body)


def _model_confusion(model: Mapping[str, Any]) -> str:
    labels = [str(label) for label in model.get("labels") or []]
    test = (model.get("metrics") or {}).get(csv_format.TEST) or {}
    matrix = test.get("confusion_matrix") or []
    wrong = model.get("misclassified") or {}
    rows = list(wrong.get("rows") or [])
    index = {label: i for i, label in enumerate(labels)}
    grouped: dict[tuple[int, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        i, j = index.get(str(row.get("true_label"))), index.get(str(row.get("predicted_label")))
        if i is not None and j is not None:
            grouped.setdefault((i, j), []).append(row)
    galleries = {
        cell: (
            "".join(
                f"<figure>{_thumb(r.get('thumb'), r.get('uri'))}<figcaption>{_name(r.get('uri'))}"
                f"<br>true <b>{_e(r.get('true_label'))}</b><br>predicted <b>"
                f"{_e(r.get('predicted_label'))}</b> {_number(r.get('score'))}</figcaption>"
                "</figure>"
                for r in items
            ),
            len(items),
        )
        for cell, items in grouped.items()
    }
    table, sections = _confusion(labels, matrix, galleries, "confusion")
    total = wrong.get("total", sum(len(v) for v in grouped.values()))
    plot = ""
    if (model.get("plots") or {}).get("confusion"):
        plot = (
            f'<img class="plot" src="{_href(model["plots"]["confusion"])}" '
            'alt="confusion matrix of the test split">'
        )
    intro = (
        f"<p>Test split: {_count(test.get('examples'))} images, <b>{_count(total)}</b> "
        "misclassified. Rows are the true labels, columns the predicted ones; an off-diagonal "
        "number links to its images (the score is the predicted label's probability, most "
        "confident mistakes first).</p>"
    )
    gallery = (
        f'<div id="misclassified">{sections}</div>'
        if sections
        else '<p id="misclassified" class="muted">No test image is misclassified.</p>'
    )
    return _section(
        "confusion",
        "Confusion matrix and misclassified images",
        f'{intro}<div class="side"><div>{table}</div>{plot}</div>{gallery}',
    )


def _model_card(model: Mapping[str, Any]) -> str:
    card = model.get("card") or {}
    backbone = model.get("backbone") or {}
    if isinstance(backbone, Mapping):
        details = ", ".join(
            f"{_e(key)} {_e(backbone[key])}"
            for key in ("image_size", "embedding_dim")
            if backbone.get(key) is not None
        )
        backbone_html = f"<b>{_e(backbone.get('name'))}</b> <span class='muted'>{_e(backbone.get('handle'))}</span>"
        if details:
            backbone_html += f"<br><span class='small'>{details}</span>"
    else:
        backbone_html = f"<b>{_e(backbone)}</b>"
    limitations = "".join(f"<li>{_e(line)}</li>" for line in card.get("limitations") or [])
    entries = [
        ("Backbone", backbone_html),
        ("Labels", ", ".join(f"<b>{_e(label)}</b>" for label in model.get("labels") or [])),
        ("Intended use", _e(card.get("intended_use"))),
        ("Limitations", f"<ul>{limitations}</ul>" if limitations else "–"),
        ("How it was evaluated", _e(card.get("evaluation"))),
        ("Training", _e(card.get("training"))),
        ("Data", _counts_table(model.get("counts") or {}, model.get("labels") or [])),
        ("Training options", _options(model.get("options") or {})),
    ]
    body = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in entries if value)
    return _section("model-card", "Model card", f'<dl class="card">{body}</dl>')


def model_page(model: Mapping[str, Any]) -> str:
    """The trainer's ``report.html`` in ``--model_dir``.

    Args:
      model: ``{"model_dir": str, "created": ISO time, "backbone": {"name", "handle",
        "image_size", "embedding_dim"} (or a name), "labels": [label, ...] (index order),
        "counts": {split: {"count": n, "labels": {label: n}}} (the manifest's), "metrics":
        {"eval": report, "test": report} (``evaluation.metrics.classification_report`` dicts;
        other keys are ignored), "train_seconds": float, "options": {option: value},
        "card": {"intended_use": str, "limitations": [str], "evaluation": str, "training":
        str}, "plots": {"curves": PNG, "confusion": PNG}, "misclassified": {"total": n,
        "rows": [{"uri", "true_label", "predicted_label", "score", "thumb"}]} (test split; the
        rows may be a cut of the total), "files": {what: file name}}``. Plots, thumbnails and
        files are paths relative to the page. Any key may be missing.

    Returns:
      The HTML document.
    """
    metrics = model.get("metrics") or {}
    test = metrics.get(csv_format.TEST) or {}
    evaluation = metrics.get(csv_format.EVAL) or {}
    backbone = model.get("backbone") or {}
    backbone_name = backbone.get("name") if isinstance(backbone, Mapping) else backbone
    stats = [
        _stat(_percent(test.get("accuracy")), "test accuracy"),
        _stat(_percent(evaluation.get("accuracy")), "eval accuracy"),
        _stat(_count(test.get("examples")), "test images"),
        _stat(_count((model.get("misclassified") or {}).get("total")), "misclassified"),
        _stat(_number(model.get("train_seconds"), 1) + " s", "training time"),
    ]
    meta = [
        f"model <b>{_e(model.get('model_dir'))}</b> · backbone <b>{_e(backbone_name)}</b>",
        f"{_count(len(model.get('labels') or []))} labels · written {_e(model.get('created'))}",
    ]
    curves = (model.get("plots") or {}).get("curves")
    curves_body = (
        f'<img class="plot" src="{_href(curves)}" alt="loss and accuracy per epoch">'
        if curves
        else '<p class="muted">No training curves.</p>'
    )
    nav = [
        ("metrics", "Metrics"),
        ("curves", "Training curves"),
        ("confusion", "Confusion matrix"),
        ("misclassified", "Misclassified images"),
        ("model-card", "Model card"),
        ("files", "Files"),
    ]
    sections = [
        _model_metrics(metrics),
        _section("curves", "Training curves", curves_body),
        _model_confusion(model),
        _model_card(model),
        _section("files", "Files", _files_list(model.get("files") or {})),
    ]
    return _page("Model report", meta, stats, nav, sections)
