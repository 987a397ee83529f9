"""The report pages (``evaluation.html_report``, ``training.report``), opened in a real browser.

Both pages are rendered from generated data and opened from disk (``file://``) in Debian's
Chromium through Playwright: no console or page error, every image (gallery thumbnails
included) loads, every in-page link has its target, a confusion-matrix cell leads to its own
images, and a full-page screenshot is taken. Set ``HUBFLOW_REPORT_SCREENS=DIR`` to keep a copy
of the screenshots in DIR.

Without ``/usr/bin/chromium`` (or the browser ``HUBFLOW_CHROMIUM`` names) the browser tests are
skipped, saying so, unless ``HUBFLOW_REQUIRE_BROWSER`` is set (CI sets it): then they fail.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from evaluation import html_report, metrics, plots
from tests.conftest import photo

CHROMIUM = os.environ.get("HUBFLOW_CHROMIUM", "/usr/bin/chromium")  # Debian's
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# User text that would be markup if it were not escaped (no "/": it also makes file names).
HOSTILE = '<i onclick=alert(1)>"fox" & <b>'


# --- generated data -----------------------------------------------------------------------------


def _thumb(folder: pathlib.Path, colour, seed: int, size=(150, 110)) -> tuple[str, str]:
    """Writes a thumbnail ``thumbs/<sha256>.jpg``; returns (sha256, path relative to the page)."""
    jpeg = html_report.thumbnail_jpeg(photo(colour, size, seed=seed))
    sha256 = hashlib.sha256(jpeg + bytes([seed % 256])).hexdigest()
    (folder / "thumbs").mkdir(exist_ok=True)
    (folder / "thumbs" / f"{sha256}.jpg").write_bytes(jpeg)
    return sha256, f"thumbs/{sha256}.jpg"


def _learning_curve_png(points) -> bytes:
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    axes = figure.add_subplot()
    ks = [p["k"] for p in points]
    means = np.array([p["mean"] for p in points])
    stds = np.array([p["std"] for p in points])
    axes.plot(ks, means, "o-")
    axes.fill_between(ks, means - stds, means + stds, alpha=0.2)
    axes.set_xscale("log")
    axes.set_xlabel("labeled images per class")
    axes.set_ylabel("test accuracy")
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


COLOURS = {"cat": (220, 140, 60), "dog": (90, 110, 200), "fox": (200, 60, 40)}


def _audit(folder: pathlib.Path, weird_uri: str = "gs://pets/img/cat_001.jpg") -> dict:
    """An audit dict as ``training.audit`` writes it, with thumbnails in ``folder/thumbs/``."""
    labels = list(COLOURS)
    seed = iter(range(10_000))

    def uri_thumb(label, name=None):
        _, thumb = _thumb(folder, COLOURS[label], next(seed))
        return name or f"gs://pets/img/{label}_{next(seed):03d}.jpg", thumb

    issues = []
    for given, suggested, score in (
        ("cat", "dog", 0.97),
        ("dog", "fox", 0.91),
        ("fox", "cat", 0.8),
    ):
        uri, thumb = uri_thumb(suggested, weird_uri if not issues else None)
        issues.append(
            dict(
                uri=uri,
                split="train",
                given_label=given,
                suggested_label=suggested,
                score=score,
                thumb=thumb,
            )
        )
    pairs = []
    for split_a, split_b, cosine in (
        ("train", "test", 0.991),
        ("eval", "train", 0.987),
        ("train", "train", 0.983),
    ):
        (uri_a, thumb_a), (uri_b, thumb_b) = uri_thumb("dog"), uri_thumb("dog")
        pairs.append(
            dict(
                uri_a=uri_a,
                uri_b=uri_b,
                split_a=split_a,
                split_b=split_b,
                cosine=cosine,
                leakage=split_a != split_b,
                thumb_a=thumb_a,
                thumb_b=thumb_b,
            )
        )
    matrix = [[9, 2, 0], [1, 10, 0], [0, 0, 8]]
    cells = {}
    for i, true in enumerate(labels):
        for j, predicted in enumerate(labels):
            items = []
            for n in range(min(matrix[i][j], 3)):
                uri, thumb = uri_thumb(predicted)
                items.append({"uri": uri, "thumb": thumb, "score": 0.9 - 0.1 * n})
            if items:
                cells[f"{true},{predicted}"] = items
    to_label = []
    for n, label in enumerate(["cat", "fox", "dog", "cat"]):
        uri, thumb = uri_thumb(label)
        to_label.append(dict(uri=uri, predicted_label=label, score=0.4 + 0.05 * n, thumb=thumb))
    points = [
        {"k": k, "mean": m, "std": s, "min": m - s, "max": m + s, "accuracies": [m] * 5}
        for k, m, s in (
            (1, 0.52, 0.09),
            (2, 0.61, 0.07),
            (5, 0.74, 0.05),
            (10, 0.81, 0.03),
            (20, 0.85, 0.02),
            (38, 0.87, 0.01),
        )
    ]
    (folder / "learning_curve.png").write_bytes(_learning_curve_png(points))
    return {
        "data_dir": "/data/pets",
        "created": "2025-11-30T12:00:00+00:00",
        "backbone": "efficientnet_lite0",
        "labels": labels,
        "counts": {
            "train": {"count": 114, "labels": {"cat": 40, "dog": 38, "fox": 36}},
            "eval": {"count": 15, "labels": {"cat": 5, "dog": 5, "fox": 5}},
            "test": {"count": 30, "labels": {"cat": 11, "dog": 11, "fox": 8}},
            "unlabeled": {"count": 42, "labels": {}},
        },
        "rows": {"read": 205, "written": 201, "duplicates": 1, "rejected": 3},
        "rejected_by_reason": {"not an image": 2, "too_large": 1},
        "label_issues": {
            "flagged": 3,
            "checked": 129,
            "method": "confident learning (cleanlab)",
            "rows": issues,
        },
        "near_duplicates": {"threshold": 0.98, "pairs": 3, "leakage": 2, "rows": pairs},
        "learning_curve": {
            "points": points,
            "reading": "accuracy is still rising at full data: more labels will likely help",
            "png": "learning_curve.png",
        },
        "confusion": {
            "split": "test",
            "labels": labels,
            "matrix": matrix,
            "accuracy": 0.9,
            "cells": cells,
        },
        "to_label": {"budget": 4, "unlabeled": 42, "rows": to_label},
        "files": {
            "label_issues": "label_issues.csv",
            "near_duplicates": "near_duplicates.csv",
            "audit": "audit.json",
        },
        "seconds": {"folds": 3.2, "near_duplicates": 0.4, "learning_curve": 11.0},
    }


# --- the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright, launched once for the module."""
    if not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} is missing (apt-get install chromium): the report pages are unchecked"
        if os.environ.get("HUBFLOW_REQUIRE_BROWSER"):
            pytest.fail(f"HUBFLOW_REQUIRE_BROWSER is set but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Opened:
    """A page opened from disk, with everything that went wrong while it loaded."""

    EXISTS = "id => !!document.getElementById(id)"

    def __init__(self, browser, path: pathlib.Path):
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"failed: {r.url}"))
        self.page.on("dialog", lambda d: (self.errors.append(f"dialog: {d.message}"), d.dismiss()))
        self.page.goto(path.as_uri(), wait_until="load")

    def images(self) -> list[dict]:
        return self.page.eval_on_selector_all(
            "img",
            "els => els.map(e => ({src: e.getAttribute('src'), complete: e.complete,"
            " width: e.naturalWidth}))",
        )

    def srcs(self, selector: str) -> list[str]:
        return self.page.eval_on_selector_all(
            selector, "els => els.map(e => e.getAttribute('src'))"
        )

    def check(self, screenshot: pathlib.Path) -> None:
        """No errors, every image loaded, every in-page link resolves; a full-page screenshot."""
        broken = [i["src"] for i in self.images() if not (i["complete"] and i["width"] > 0)]
        assert not broken, f"images that did not load: {broken}"
        targets = self.page.eval_on_selector_all(
            "a[href^='#']", "els => els.map(e => e.getAttribute('href').slice(1))"
        )
        missing = [t for t in targets if not self.page.evaluate(self.EXISTS, t)]
        assert targets and not missing, f"links to missing anchors: {missing}"
        self.page.evaluate("window.scrollTo(0, 0)")  # the sticky section links at the top
        self.page.screenshot(path=str(screenshot), full_page=True)
        with Image.open(screenshot) as shot:
            assert shot.height > 900  # the whole page, not the viewport
            assert len(shot.convert("RGB").getcolors(1 << 24)) > 1000  # drawn, not blank
        keep = os.environ.get("HUBFLOW_REPORT_SCREENS")
        if keep:
            os.makedirs(keep, exist_ok=True)
            shutil.copy(screenshot, os.path.join(keep, screenshot.name))
        assert not self.errors, self.errors


@pytest.fixture
def open_page(browser):
    """Opens pages in the module's browser; closes them after the test."""
    opened: list[Opened] = []

    def open_(path: pathlib.Path) -> Opened:
        opened.append(Opened(browser, path))
        return opened[-1]

    yield open_
    for page in opened:
        page.page.close()


def _cell_link(opened: Opened, true_index: int, predicted_index: int) -> None:
    """Clicking a matrix cell scrolls to its gallery."""
    anchor = f"cell-{true_index}-{predicted_index}"
    opened.page.click(f"table.cm a[href='#{anchor}']")
    assert opened.page.evaluate("location.hash") == f"#{anchor}"
    top = opened.page.evaluate(
        "id => document.getElementById(id).getBoundingClientRect().top", anchor
    )
    assert -1 < top < 900  # scrolled into view


# --- the audit page -----------------------------------------------------------------------------


def test_audit_page_in_a_browser(open_page, tmp_path):
    audit = _audit(tmp_path, weird_uri=f"gs://pets/{HOSTILE} #1?.jpg")
    (tmp_path / html_report.REPORT_FILE).write_text(html_report.audit_page(audit), "utf-8")
    opened = open_page(tmp_path / html_report.REPORT_FILE)

    # Every thumbnail of the dict is on the page, and every confusion cell links to its own.
    thumbs = {r["thumb"] for r in audit["label_issues"]["rows"] + audit["to_label"]["rows"]}
    thumbs |= {r[k] for r in audit["near_duplicates"]["rows"] for k in ("thumb_a", "thumb_b")}
    labels = audit["labels"]
    for i, true in enumerate(labels):
        for j, predicted in enumerate(labels):
            items = audit["confusion"]["cells"].get(f"{true},{predicted}", [])
            assert opened.srcs(f"#cell-{i}-{j} img") == [item["thumb"] for item in items]
            links = opened.page.locator(f"table.cm a[href='#cell-{i}-{j}']").count()
            assert links == (1 if items else 0)
            thumbs |= {item["thumb"] for item in items}
    assert set(opened.srcs("img.thumb")) == thumbs
    assert opened.srcs("img.plot") == ["learning_curve.png"]
    _cell_link(opened, 0, 1)

    # Leakage pairs are marked, the user's file name is shown as text, nothing ran.
    assert opened.page.locator("#near-duplicates .badge.leak").count() == 2
    assert f"{HOSTILE} #1?.jpg" in opened.page.inner_text("#label-issues")
    name = opened.page.locator("#label-issues .name").first.get_attribute("title")
    assert name == audit["label_issues"]["rows"][0]["uri"]
    assert opened.page.locator("i[onclick]").count() == 0
    opened.check(tmp_path / "audit_report.png")


def test_audit_page_without_unlabeled_images_or_results(open_page, tmp_path):
    audit = {"data_dir": "d", "labels": ["a", "b"], "label_issues": {"rows": []}}
    (tmp_path / "report.html").write_text(html_report.audit_page(audit), "utf-8")
    opened = open_page(tmp_path / "report.html")
    assert "No unlabeled images" in opened.page.inner_text("#to-label")
    assert opened.images() == []
    assert not opened.errors


# --- the trainer's page -------------------------------------------------------------------------


@pytest.fixture
def trained(tmp_path):
    """A data dir whose test split is two shards, and a 'model' that predicts argmax(embedding).

    Test images whose embedding points at another label are the planted mistakes.
    """
    import tensorflow as tf
    import tf_keras

    from schemas import features
    from schemas import manifest as manifest_lib
    from schemas.backbones import BackboneSpec
    from training import data
    from training.config import TrainConfig

    labels = ["cat", "dog", HOSTILE]
    colours = list(COLOURS.values())
    data_dir, model_dir = tmp_path / "data", tmp_path / "model"
    data_dir.mkdir()
    model_dir.mkdir()
    mistakes = {}  # uri -> (true index, predicted index)
    splits = manifest_lib.empty_splits(labels)
    files = {}
    rng = np.random.default_rng(0)
    for split, shards, per_shard in (("train", 1, 6), ("eval", 1, 6), ("test", 2, 9)):
        files[split] = []
        for shard in range(shards):
            path = data_dir / f"{split}-{shard:05d}-of-{shards:05d}{features.TFRECORD_SUFFIX}"
            with tf.io.TFRecordWriter(str(path)) as writer:
                for n in range(per_shard):
                    true = n % 3
                    guess = (true + 1) % 3 if split == "test" and n in (1, 5 + shard) else true
                    uri = f"/photos/{split}/{shard}/{labels[true]}_{n}.jpg"
                    if guess != true:
                        mistakes[uri] = (true, guess)
                    jpeg = photo(colours[true], (64, 48), seed=100 * shard + n)
                    embedding = np.eye(3)[guess] * 4 + rng.uniform(0, 0.5, 3)
                    writer.write(
                        features.make_example(
                            jpeg=jpeg,
                            height=48,
                            width=64,
                            source=uri,
                            sha256=hashlib.sha256(uri.encode()).hexdigest(),
                            label=true,
                            label_text=labels[true],
                            embedding=embedding,
                        ).SerializeToString()
                    )
                    splits[split]["count"] += 1
                    splits[split]["labels"][labels[true]] += 1
            files[split].append(str(path))
    manifest = manifest_lib.Manifest(
        labels=labels,
        backbone=BackboneSpec("standin", "/backbones/standin", 32, 3),
        splits=splits,
        rows=manifest_lib.RowCounts(54, 54, 0, 0),
        rejected_by_reason={},
        options={},
        versions={},
        created="2025-11-30T12:00:00+00:00",
    )
    counts = {split: splits[split]["count"] for split in files}
    dataset = data.Dataset(manifest, files, counts)
    config = TrainConfig(data_dir=str(data_dir), model_dir=str(model_dir), batch_size=4)
    model = tf_keras.Sequential(
        [tf_keras.layers.Dense(3, activation="softmax", kernel_initializer="identity")]
    )
    model.build((None, 3))
    return config, dataset, model, mistakes


def _reports(config, dataset, model, history) -> dict:
    """What the trainer computes and writes before the page: metrics and the two plots."""
    from training import data, layout, task

    splits = data.make_split_datasets(config, dataset)
    labels = dataset.manifest.labels
    reports = {}
    for split in ("eval", "test"):
        y, probabilities = task.predict(model, splits[split])
        reports[split] = metrics.classification_report(y, probabilities, labels)
    reports["train_seconds"] = 1.5
    model_dir = pathlib.Path(config.model_dir)
    matrix = reports["test"]["confusion_matrix"]
    (model_dir / layout.CONFUSION_PNG).write_bytes(
        plots.confusion_matrix_png(matrix, labels, "test split")
    )
    (model_dir / layout.CURVES_PNG).write_bytes(plots.training_curves_png(history))
    return reports


def test_model_page_in_a_browser(open_page, trained):
    from training import layout, report

    config, dataset, model, mistakes = trained
    history = {
        "loss": [1.0, 0.6, 0.4],
        "val_loss": [1.1, 0.7, 0.5],
        "accuracy": [0.5, 0.8, 0.9],
        "val_accuracy": [0.4, 0.7, 0.8],
    }
    reports = _reports(config, dataset, model, history)
    path = pathlib.Path(report.write_model_report(config, dataset, model, reports))
    model_dir = pathlib.Path(config.model_dir)
    assert path == model_dir / html_report.REPORT_FILE
    # --overwrite sets the page and its thumbnails aside with the rest of the model.
    assert {html_report.REPORT_FILE, layout.REPORT_THUMBS_DIR} <= set(
        layout.present(str(model_dir))
    )

    opened = open_page(path)
    labels = dataset.manifest.labels
    shown = {}  # (true, predicted) -> file names in that cell's gallery
    for i in range(3):
        for j in range(3):
            names = opened.page.eval_on_selector_all(
                f"#cell-{i}-{j} figure .name", "els => els.map(e => e.getAttribute('title'))"
            )
            if names:
                shown[(i, j)] = sorted(names)
    expected = {}
    for uri, cell in mistakes.items():
        expected.setdefault(cell, []).append(uri)
    assert shown == {cell: sorted(uris) for cell, uris in expected.items()}
    assert len(list((model_dir / layout.REPORT_THUMBS_DIR).iterdir())) == len(mistakes)
    assert opened.srcs("img.plot") == [layout.CURVES_PNG, layout.CONFUSION_PNG]
    assert f"{len(mistakes)}" in opened.page.inner_text("#confusion")
    card = opened.page.inner_text("#model-card")
    assert HOSTILE in card and "standin" in card and "Limitations" in card
    assert re.search(r"test split \(18 images", card)
    assert labels[2] in opened.page.inner_text("#metrics")
    _cell_link(opened, *next(iter(expected)))
    opened.check(pathlib.Path(config.model_dir).parent / "model_report.png")


# --- escaping, without a browser ----------------------------------------------------------------

# The elements the page templates use; user text must not add any.
PAGE_TAGS = set(
    "html head meta title style body header nav main footer div section h1 h2 h3 p a b br span "
    "img figure figcaption table thead tbody tr th td ol ul li dl dt dd".split()
)


def _tags(page: str) -> list[tuple[str, list]]:
    """(tag, attributes) of every start tag of an HTML document."""
    tags = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, attrs))

        handle_startendtag = handle_starttag

    Collect().feed(page)
    return tags


def test_user_strings_are_escaped_and_links_stay_relative():
    evil_uri = '"><script>alert(1)</script><img src=x onerror=alert(2)>.jpg'
    audit = {
        "labels": ["<script>alert(3)</script>", "b"],
        "learning_curve": {"reading": "<img src=x onerror=alert(4)>", "png": "javascript:alert(5)"},
        "label_issues": {"rows": [{"uri": evil_uri, "given_label": "</table>", "thumb": "x.jpg"}]},
        "confusion": {
            "labels": ["<script>alert(3)</script>", "b"],
            "matrix": [[1, 0], [0, 1]],
            "cells": {"<script>alert(3)</script>,<script>alert(3)</script>": [{"uri": evil_uri}]},
        },
        "files": {"audit": "javascript:alert(6)", "csv": "a b#?.csv"},
    }
    model = {
        "labels": ["<script>alert(3)</script>", "b"],
        "misclassified": {
            "rows": [
                {
                    "uri": evil_uri,
                    "true_label": "b",
                    "predicted_label": "<script>alert(3)</script>",
                    "thumb": "report_thumbs/x.jpg",
                }
            ]
        },
        "options": {"data_dir": "<script>alert(7)</script>"},
        "card": {"limitations": ["<script>alert(8)</script>"]},
    }
    for page in (html_report.audit_page(audit), html_report.model_page(model)):
        tags = _tags(page)
        assert {tag for tag, _ in tags} <= PAGE_TAGS  # the user's <script>, <img> are text
        attributes = [(name, value or "") for _, attrs in tags for name, value in attrs]
        assert not [a for a in attributes if a[0].startswith("on")]
        assert not [a for a in attributes if a[0] in ("href", "src") and ":" in a[1]]
        assert "&lt;script&gt;alert(3)&lt;/script&gt;" in page
    audit_html = html_report.audit_page(audit)
    assert "&lt;/table&gt;" in audit_html
    assert 'href="a%20b%23%3F.csv"' in audit_html
    assert 'src="javascript%3Aalert%285%29"' in audit_html


def test_thumbnails_are_small_upright_jpegs():
    buffer = io.BytesIO()
    wide = Image.new("RGB", (800, 200), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    wide.save(buffer, "JPEG", exif=exif)
    with Image.open(io.BytesIO(html_report.thumbnail_jpeg(buffer.getvalue()))) as thumb:
        assert thumb.format == "JPEG" and thumb.mode == "RGB"
        assert thumb.size == (40, html_report.THUMB_SIDE)  # upright: tall, longer side capped
