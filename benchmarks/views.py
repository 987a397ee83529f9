"""Augmented train views (``--train_views K``): what they cost to preprocess, what they give.

For each dataset and each K (0 is the baseline, measured in the same run), the preprocessing job
runs with ``--train_views K`` (Lite0, TFLite) and the trainer trains its default (tuned) head on
the result: on all train labels and on ``--examples_per_class`` labels per class over several
``--subsample_seed`` draws. Reported: the job's wall and CPU seconds, images per second, and the
test accuracy (mean over draws) against K = 0.

    python -m benchmarks.views --work_dir /tmp/views_bench

Datasets: hymenoptera (train/ hashed into train and eval, val/ pinned as test) and
cats-vs-dogs-2k (train/ hashed, test/ pinned), as ``benchmarks/train.py`` builds them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence

import numpy as np

from benchmarks import common

DATASETS = {
    "hymenoptera": ("hymenoptera", {"train": "", "val": "test"}),
    "cats-vs-dogs-2k": ("cats-vs-dogs-2k", {"train": "", "test": "test"}),
}


def view_counts(value: str) -> list[int]:
    """An argparse type: comma-separated view counts, 0 (the baseline) allowed."""
    return common.int_list(value, minimum=0)


def preprocess(name: str, k: int, args, work_dir: str) -> dict:
    """Runs the job with ``--train_views k`` (timed, in a subprocess); its cost."""
    folder, folders = DATASETS[name]
    csv_path = os.path.join(work_dir, f"{name}.csv")
    common.write_folder_csv(os.path.join(common.SHARED_DATA, folder), folders, csv_path)
    output_dir = os.path.join(work_dir, "data", f"{name}_k{k}")
    command = common.preprocess_command(
        f"--input_csv={csv_path}",
        "--backbone=efficientnet_lite0",
        "--eval_fraction=0.2",
        "--test_fraction=0",
        f"--train_views={k}",
        f"--output_dir={output_dir}",
        "--overwrite",
        *args.job_flag,
    )
    common.log(f"  job: {shlex.join(command)}")
    run = common.run_logged(command, os.path.join(work_dir, "logs", f"preprocess_{name}_k{k}.log"))
    from schemas import features

    manifest = common.read_manifest(output_dir)
    splits = common.split_counts(manifest, output_dir)
    written = manifest["rows"]["written"]
    embedded = written + k * splits["train"]
    return {
        "dir": output_dir,
        "command": shlex.join(command),
        "wall_s": round(run["wall_s"], 1),
        "cpu_s": round(run["cpu_s"], 1),
        "loadavg_1m_before": run["loadavg_1m_before"],
        "written": written,
        "splits": splits,
        "embedded_images": embedded,
        "images_per_s": round(written / run["wall_s"], 2),
        "embeddings_per_s": round(embedded / run["wall_s"], 2),
        "bytes": sum(
            os.path.getsize(os.path.join(output_dir, f))
            for f in os.listdir(output_dir)
            if f.endswith(features.TFRECORD_SUFFIX)
        ),
    }


def train(data_dir: str, model_dir: str, flags: list[str]) -> dict:
    """The trainer's default (tuned) head; what ``benchmarks.train.train_run`` records."""
    from benchmarks.train import train_run

    return train_run(data_dir, model_dir, flags)


def run_training(name: str, k: int, data_dir: str, args, work_dir: str) -> dict:
    """All labels (``--all_labels`` datasets) and each ``--few_label_k`` n per class over
    ``--draws`` draws: ``all``, ``few{n}_s{seed}``, ``few{n}_mean`` and ``few{n}_std``."""
    out: dict = {}
    models = os.path.join(work_dir, "models", f"{name}_k{k}")
    if name in args.all_labels:
        out["all"] = train(data_dir, os.path.join(models, "all"), [])
        common.log(f"  {name} K={k} all labels: test acc {out['all']['test_accuracy']:.4f}")
    for n in args.few_label_k:
        accs = []
        for seed in range(args.draws):
            flags = [f"--examples_per_class={n}", f"--subsample_seed={seed}"]
            run = train(data_dir, os.path.join(models, f"few{n}_s{seed}"), flags)
            out[f"few{n}_s{seed}"] = run
            accs.append(run["test_accuracy"])
            common.log(f"  {name} K={k} {n}/class seed {seed}: {accs[-1]:.4f}")
        out[f"few{n}_mean"] = float(np.mean(accs)) if accs else None
        out[f"few{n}_std"] = float(np.std(accs)) if accs else None
    return out


def _few_label_counts(results: dict) -> list[int]:
    keys = {
        key
        for per_k in results["datasets"].values()
        for entry in per_k.values()
        for key in entry.get("train", {})
    }
    return sorted(int(key[3:-5]) for key in keys if key.startswith("few") and key.endswith("_mean"))


def format_report(results: dict) -> str:
    lines = common.report_header("Augmented train views (--train_views K)", results)
    counts = _few_label_counts(results)
    header = (
        f"{'dataset':<16} {'K':>2} {'wall s':>7} {'CPU s':>7} {'load':>5} {'img/s':>6} "
        f"{'x K=0 CPU':>9} {'MiB':>6} {'all':>7} {'vs K=0':>7}"
    )
    for n in counts:
        header += f" {f'{n}/class':>9} {'std':>6} {'vs K=0':>7}"
    lines.append(header)
    for name, per_k in results["datasets"].items():
        base = per_k.get("0", {})
        base_train = base.get("train", {})
        for k, entry in per_k.items():
            pre, tr = entry.get("preprocess", {}), entry.get("train", {})
            cpu_ratio = common.ratio(pre.get("cpu_s"), base.get("preprocess", {}).get("cpu_s"))
            all_acc = tr.get("all", {}).get("test_accuracy")
            base_all = base_train.get("all", {}).get("test_accuracy")
            line = (
                f"{name:<16} {k:>2} {common.cell(pre.get('wall_s'), 7, 1)} "
                f"{common.cell(pre.get('cpu_s'), 7, 1)} "
                f"{common.cell(pre.get('loadavg_1m_before'), 5, 2)} "
                f"{common.cell(pre.get('images_per_s'), 6, 1)} {common.cell(cpu_ratio, 9, 2)} "
                f"{common.cell((pre.get('bytes') or 0) / 2**20, 6, 1)} "
                f"{common.cell(all_acc, 7, 4)} {common.cell(_gain(all_acc, base_all), 7, 4)}"
            )
            for n in counts:
                few, base_few = tr.get(f"few{n}_mean"), base_train.get(f"few{n}_mean")
                line += (
                    f" {common.cell(few, 9, 4)} {common.cell(tr.get(f'few{n}_std'), 6, 4)} "
                    f"{common.cell(_gain(few, base_few), 7, 4)}"
                )
            lines.append(line)
    return "\n".join(lines)


def _gain(value: float | None, base: float | None) -> float | None:
    return value - base if value is not None and base is not None else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work_dir", required=True)
    p.add_argument("--ks", type=view_counts, default=[0, 2, 4, 8])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument(
        "--all_labels",
        default="hymenoptera",
        help="datasets also trained on all labels, comma-separated ('' for none)",
    )
    p.add_argument("--draws", type=int, default=5)
    p.add_argument(
        "--few_label_k",
        type=common.int_list,
        default=[10],
        help="labels per class of the few-label runs, comma-separated (default 10)",
    )
    p.add_argument("--stage", choices=("preprocess", "train", "all"), default="all")
    p.add_argument("--rebuild", action="store_true", help="rerun the jobs even if built")
    common.add_job_flag(p, "the preprocessing jobs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.all_labels = [d for d in args.all_labels.split(",") if d]
    os.makedirs(args.work_dir, exist_ok=True)
    path = os.path.join(args.work_dir, "views.json")
    results = (
        common.read_json(path, "results")
        if os.path.exists(path)
        else {"command": common.command_line(), "machine": common.machine_info(), "datasets": {}}
    )
    results["json"] = path
    started = time.perf_counter()
    try:
        for name in [d for d in args.datasets.split(",") if d]:
            per_k = results["datasets"].setdefault(name, {})
            for k in args.ks:
                entry = per_k.setdefault(str(k), {})
                built = os.path.exists(
                    os.path.join(args.work_dir, "data", f"{name}_k{k}", common.MANIFEST_FILE)
                )
                if args.stage in ("preprocess", "all") and (args.rebuild or not built):
                    common.log(f"preprocess {name} K={k}")
                    entry["preprocess"] = preprocess(name, k, args, args.work_dir)
                    common.write_json(path, results)
                if args.stage in ("train", "all"):
                    data_dir = os.path.join(args.work_dir, "data", f"{name}_k{k}")
                    common.log(f"train {name} K={k}")
                    trained = run_training(name, k, data_dir, args, args.work_dir)
                    entry.setdefault("train", {}).update(trained)
                    common.write_json(path, results)
    except common.BenchmarkError as e:
        return common.fail(results, e)
    results["seconds"] = round(time.perf_counter() - started, 1)
    common.write_json(path, results)
    print(format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
