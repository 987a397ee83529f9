"""The one-command demo: ``python -m demo`` (console script ``hubflow-demo``).

Runs the whole product offline on the DirectRunner: writes a small generated image set with a
label CSV (shapes, see :mod:`demo.sample`), preprocesses it with the default ImageNet
backbone (``efficientnet_lite2``, built locally on first use), trains a classifier head on the
embeddings, prints the test metrics, and classifies a few images through the exported SavedModel.
Everything is overwritten on a rerun.
"""

from __future__ import annotations

import argparse
import glob
import io
import logging
import os
import sys
import time
from collections.abc import Sequence

from PIL import Image

from backbones.registry import DEFAULT_BACKBONE
from demo import sample
from schemas import serving
from schemas.cli import configure_logging


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/4] {text}", flush=True)


def _classify_samples(export_dir: str, work_dir: str) -> list[tuple[str, str, str, float]]:
    import tensorflow as tf

    serve = tf.saved_model.load(export_dir).signatures[serving.SIGNATURE_NAME]
    files = []
    for folder in sorted(glob.glob(os.path.join(work_dir, "images", "*"))):
        files += sorted(glob.glob(os.path.join(folder, "*.jpg")))[-2:]
    payloads = []
    for i, path in enumerate(files):
        data = open(path, "rb").read()
        if i % 2:  # every other one as PNG: the export decodes either
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buf, "PNG")
            data = buf.getvalue()
        payloads.append(data)
    out = serve(**{serving.INPUT_KEY: tf.constant(payloads)})
    return [
        (
            os.path.relpath(path, work_dir) + (" (as PNG)" if i % 2 else ""),
            os.path.basename(os.path.dirname(path)),
            label.decode(),
            float(score),
        )
        for i, (path, label, score) in enumerate(
            zip(files, out[serving.CLASSES].numpy(), out[serving.SCORES].numpy(), strict=True)
        )
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hubflow-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="hubflow-demo", help="where everything is written")
    parser.add_argument("--per_class", type=int, default=40, help="images per class (default 40)")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    args = parser.parse_args(argv)
    configure_logging("pipeline", "training", "backbones")
    logging.getLogger("evaluation").setLevel(logging.WARNING)
    started = time.monotonic()
    work_dir = os.path.abspath(args.work_dir)
    data_dir = os.path.join(work_dir, "dataset")
    model_dir = os.path.join(work_dir, "model")

    from pipeline import preprocess

    _step(1, f"writing {3 * args.per_class} generated sample images (shapes) to {work_dir}")
    csv_path = sample.write_sample(work_dir, args.per_class)

    _step(2, f"preprocessing with the {args.backbone} backbone on the DirectRunner")
    code = preprocess.main(
        [
            f"--input_csv={csv_path}",
            f"--output_dir={data_dir}",
            f"--backbone={args.backbone}",
            "--overwrite",
        ]
    )
    if code:
        return code

    _step(3, "training a classifier head on the embeddings")
    from evaluation.metrics import format_report_table
    from training import task
    from training.config import parse_config

    result = task.train(
        parse_config([f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--overwrite"])
    )
    test = result.metrics["test"]
    print(f"test accuracy: {test['accuracy']:.3f} on {test['examples']} held-out images")
    print(format_report_table(test))

    _step(4, f"classifying a few images through the exported model {result.export_dir}")
    rows = _classify_samples(result.export_dir, work_dir)
    width = max(len(r[0]) for r in rows)
    print(f"{'image':<{width}}  {'true':<8}  {'predicted':<9}  score")
    for path, true, predicted, score in rows:
        print(f"{path:<{width}}  {true:<8}  {predicted:<9}  {score:.3f}")

    print(f"\ndone in {time.monotonic() - started:.0f} s. Outputs:")
    print(f"  images and labels.csv   {work_dir}")
    print(f"  TFRecords + manifest    {data_dir}")
    print(f"  metrics.json, plots     {model_dir}")
    print(f"  serving SavedModel      {result.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
