"""A real trainer run writes report.html into --model_dir, with its images beside it."""

from __future__ import annotations

import html.parser
import pathlib

import pytest

from evaluation.html_report import REPORT_FILE
from pipeline import preprocess
from tests.conftest import write_dataset
from training import layout, task

pytestmark = pytest.mark.slow


class _Sources(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.extend(value for name, value in attrs if name == "src")


def test_training_writes_a_report_whose_images_are_all_there(tmp_path, tiny_backbone, capsys):
    images, data_dir, model_dir = tmp_path / "images", tmp_path / "data", tmp_path / "model"
    write_dataset(images, per_class=12)
    preprocess.run(
        [
            f"--image_dir={images}",
            f"--output_dir={data_dir}",
            f"--backbone={tiny_backbone}",
            "--eval_fraction=0.25",
            "--test_fraction=0.25",
        ]
    )
    argv = [f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--epochs=2", "--seed=3"]
    assert task.main(argv) == 0

    page_path = model_dir / REPORT_FILE
    assert f"report: {page_path}" in capsys.readouterr().out
    page = page_path.read_text()
    assert "Model card" in page and "Intended use" in page
    sources = _Sources()
    sources.feed(page)
    assert sources.images, "the report shows at least the curves and the confusion matrix"
    for src in sources.images:  # relative links that resolve from the page's folder
        assert not src.startswith(("/", "http:", "https:", "file:")), src
        assert (model_dir / pathlib.PurePosixPath(src)).is_file(), src
    thumbs = model_dir / layout.REPORT_THUMBS_DIR
    shown = {src for src in sources.images if src.startswith(layout.REPORT_THUMBS_DIR + "/")}
    assert len(shown) == (len(list(thumbs.iterdir())) if thumbs.exists() else 0)
