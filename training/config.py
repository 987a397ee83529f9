"""The trainer's command line, validated once into a typed :class:`TrainConfig`.

Labels, backbone and embedding size are not flags: they come from the dataset's manifest.
Defaults that depend on the mode (epochs, batch size, patience) apply only to flags not given;
they are resolved here and written to ``config.json`` next to the model, so a run can be read
back and repeated. A value given is used as given, or refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from schemas.cli import Parser, UsageError
from training.schedules import SCHEDULES

PROG = "hubflow-train"

FEATURES_EMBEDDING = "embedding"
FEATURES_IMAGE = "image"
MODEL_HEAD = "head"
SCRATCH_MODELS = ("linear", "dnn", "cnn")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
LR_SCHEDULES = tuple(SCHEDULES)
QUANTIZE_NONE = "none"
QUANTIZE_INT8 = "int8"
QUANTIZE_CHOICES = (QUANTIZE_NONE, QUANTIZE_INT8)
CLASSIFIER_ZSCORE = "zscore"
CLASSIFIER_COSINE = "cosine"
CLASSIFIERS = (CLASSIFIER_ZSCORE, CLASSIFIER_COSINE)
# The head tuner's candidates (training.tuning): each sets these flags, every other option is
# as configured. Chosen from measurements on hymenoptera, cats-vs-dogs-2k and MNIST embeddings
# (README, "Training"): of L2 0-0.1, dropout 0-0.5, label smoothing 0-0.1, learning rate
# 3e-4-3e-3 and both classifiers, only these changed the eval-chosen head for the better.
TUNING_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"classifier": CLASSIFIER_ZSCORE, "l2": 0.0},
    {"classifier": CLASSIFIER_COSINE, "l2": 0.0},
    {"classifier": CLASSIFIER_COSINE, "l2": 0.1},
)
TUNED_FLAGS = tuple(dict.fromkeys(name for c in TUNING_CANDIDATES for name in c))


def tuning_candidates(fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates with the flags in ``fixed`` (given on the command line) set to their
    values in every one; candidates that became the same are tried once."""
    unique: list[dict[str, Any]] = []
    for candidate in TUNING_CANDIDATES:
        settings = {**candidate, **{k: v for k, v in fixed.items() if k in candidate}}
        if settings not in unique:
            unique.append(settings)
    return unique


# Mode -> (epochs, batch size, early-stopping patience). Embedding heads train in seconds, so
# they get many epochs and rely on early stopping; image modes pay a backbone pass per step.
_MODE_DEFAULTS = {
    FEATURES_EMBEDDING: (200, 128, 10),
    FEATURES_IMAGE: (15, 32, 3),
    "scratch": (30, 64, 5),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Resolved trainer options (see ``build_parser`` for their meaning)."""

    data_dir: str
    model_dir: str
    features: str = FEATURES_EMBEDDING
    model: str = MODEL_HEAD
    classifier: str = CLASSIFIER_ZSCORE
    dropout: float = 0.2
    hidden_units: tuple[int, ...] = ()
    augment: bool = False
    crop: bool = True
    flip: bool = True
    brightness: bool = True
    contrast: bool = True
    rotation: bool = True
    zoom: bool = True
    fine_tune: bool = False
    fine_tune_layers: int = 0  # 0 = all
    fine_tune_learning_rate: float | None = None
    fine_tune_epochs: int = 5
    image_size: int = 28
    channels: int = 1
    batch_norm: bool = False
    epochs: int = 200
    batch_size: int = 128
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    label_smoothing: float = 0.0
    l2: float = 0.0
    class_weight: str = "none"
    patience: int = 10
    seed: int = 42
    overwrite: bool = False
    break_lock: bool = False
    export_tflite: bool = False
    quantize: str = QUANTIZE_NONE
    # True: the embedding head is tuned on eval (training.tuning); resolved False for other modes.
    tune: bool = True
    tune_fixed: tuple[str, ...] = ()  # TUNED_FLAGS given on the command line: held in every try
    examples_per_class: int | None = None  # train on this many train examples per class
    subsample_seed: int | None = None  # the draw's seed (0 unless given; None without K)
    # An embedding head samples the augmented train views the dataset stores (hubflow-preprocess
    # --train_views), one of centre + views per example and epoch; False: the centre only.
    views: bool = True

    @property
    def from_scratch(self) -> bool:
        return self.model in SCRATCH_MODELS

    @property
    def uses_images(self) -> bool:
        return self.from_scratch or self.features == FEATURES_IMAGE

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["hidden_units"] = list(self.hidden_units)
        data["tune_fixed"] = list(self.tune_fixed)
        return data


def _units(value: str) -> tuple[int, ...]:
    if not value.strip():
        return ()
    try:
        units = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {value!r}"
        ) from None
    if any(u <= 0 for u in units):
        raise argparse.ArgumentTypeError(f"units must be positive, got {value!r}")
    return units


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Train, evaluate and export a hubflow image classifier.")
    p.add_argument("--data_dir", help="a hubflow-preprocess output dir (required)")
    p.add_argument(
        "--model_dir", help="where checkpoints, metrics, plots and exports go (required)"
    )
    p.add_argument(
        "--features",
        choices=(FEATURES_EMBEDDING, FEATURES_IMAGE),
        default=None,
        help="train a head on stored embeddings (default) or on the images",
    )
    p.add_argument(
        "--model",
        choices=(MODEL_HEAD, *SCRATCH_MODELS),
        default=MODEL_HEAD,
        help="head on a backbone (default) or a small net trained from scratch",
    )
    p.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default=None,
        help="the head's input and start: zscore (default with --no_tune) = z-scored embedding, "
        "output weights from zero; cosine = L2-normalised embedding, output weights from the "
        "normalised class means (an embedding head tunes it unless given)",
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="dropout rate (default 0.2; 0.5 for --model cnn, whose dense layer overfits digits)",
    )
    p.add_argument("--hidden_units", type=_units, default=(), help="e.g. 256,128 (default none)")
    p.add_argument("--augment", action="store_true", help="training-time augmentation (images)")
    for name in ("crop", "flip", "brightness", "contrast", "rotation", "zoom"):
        p.add_argument(
            f"--{name}",
            action=argparse.BooleanOptionalAction,
            default=True,
            help=f"with --augment: random {name} (default on)",
        )
    p.add_argument(
        "--fine_tune",
        action="store_true",
        help="after the head converges, unfreeze the backbone's top layers",
    )
    p.add_argument("--fine_tune_layers", type=int, default=0, help="top layers to unfreeze (0=all)")
    p.add_argument(
        "--fine_tune_learning_rate", type=float, default=None, help="default: --learning_rate / 10"
    )
    p.add_argument("--fine_tune_epochs", type=int, default=5)
    p.add_argument(
        "--image_size", type=int, default=28, help="input side for --model linear|dnn|cnn"
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=1,
        help="input channels for --model linear|dnn|cnn (1 = grayscale)",
    )
    p.add_argument("--batch_norm", action="store_true", help="batch norm in --model cnn")
    p.add_argument("--epochs", type=int, default=None, help="default depends on the mode")
    p.add_argument("--batch_size", type=int, default=None, help="default depends on the mode")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="constant")
    p.add_argument("--label_smoothing", type=float, default=0.0)
    p.add_argument(
        "--l2",
        type=float,
        default=None,
        help="L2 weight penalty on the new layers (default 0; an embedding head tunes it unless "
        "given)",
    )
    p.add_argument(
        "--no_tune",
        action="store_true",
        help="train one embedding head with the given flags instead of choosing --classifier "
        "and --l2 on the eval split",
    )
    p.add_argument(
        "--examples_per_class",
        type=int,
        default=None,
        help="train on this many labeled examples per class, drawn from the train split "
        "(eval and test unchanged)",
    )
    p.add_argument(
        "--subsample_seed",
        type=int,
        default=None,
        help="with --examples_per_class: the seed of the draw (default 0)",
    )
    p.add_argument(
        "--views",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="an embedding head samples the augmented views of each train image that the "
        "dataset stores (hubflow-preprocess --train_views), a new one per epoch; --no-views: "
        "the centre view only (default on; no effect on a dataset without views)",
    )
    p.add_argument("--class_weight", choices=("none", "balanced"), default="none")
    p.add_argument(
        "--patience",
        type=int,
        default=None,
        help="early-stopping patience in epochs on eval loss (default by mode; 0 stops at the "
        "first epoch without improvement)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh in an existing --model_dir (the old model is kept until the new "
        "export is complete)",
    )
    p.add_argument(
        "--break_lock",
        action="store_true",
        help="take over a gs:// --model_dir whose lock a killed run left behind",
    )
    p.add_argument(
        "--export_tflite",
        action="store_true",
        help="also write model.tflite (one float image in, probabilities out) and measure it "
        "against the SavedModel on the test split",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None,
        help="with --export_tflite: int8 weights and activations, calibrated on train images "
        "(default none)",
    )
    return p


def _validate_numbers(args: argparse.Namespace) -> None:
    """Refuses values no run can use, naming the flag (nan and inf included)."""
    for flag in ("learning_rate", "fine_tune_learning_rate", "dropout", "label_smoothing", "l2"):
        value = getattr(args, flag)
        if not math.isfinite(value):
            raise UsageError(f"--{flag} must be a finite number, got {value}")
    for flag, low, high in (("dropout", 0.0, 0.99), ("label_smoothing", 0.0, 0.99)):
        value = getattr(args, flag)
        if not low <= value <= high:
            raise UsageError(f"--{flag} must be in [{low}, {high}], got {value}")
    for flag in (
        "learning_rate",
        "fine_tune_learning_rate",
        "image_size",
        "epochs",
        "batch_size",
        "fine_tune_epochs",
    ):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag} must be positive, got {getattr(args, flag)}")
    for flag in ("l2", "patience", "fine_tune_layers"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must not be negative, got {getattr(args, flag)}")
    if args.examples_per_class is not None and args.examples_per_class <= 0:
        raise UsageError(f"--examples_per_class must be positive, got {args.examples_per_class}")


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parses the command line into a validated config.

    Raises:
      UsageError: for missing or contradictory flags.
    """
    args = build_parser().parse_args(argv)
    if not args.data_dir:
        raise UsageError("--data_dir is required")
    if not args.model_dir:
        raise UsageError("--model_dir is required")
    scratch = args.model in SCRATCH_MODELS
    if scratch and args.features is not None:
        raise UsageError(f"--model {args.model} trains on images from scratch; drop --features")
    features = args.features or FEATURES_EMBEDDING
    if (args.augment or args.fine_tune) and not scratch and features != FEATURES_IMAGE:
        flag = "--augment" if args.augment else "--fine_tune"
        raise UsageError(f"{flag} needs --features image (stored embeddings cannot be augmented)")
    if args.fine_tune and scratch:
        raise UsageError("--fine_tune applies to a backbone; --model linear|dnn|cnn has none")
    if args.classifier is not None and scratch:
        raise UsageError(f"--classifier applies to a head on a backbone, not --model {args.model}")
    if args.quantize is not None and not args.export_tflite:
        raise UsageError(
            f"--quantize {args.quantize} applies to the TFLite model; add --export_tflite"
        )
    if args.subsample_seed is not None and args.examples_per_class is None:
        raise UsageError("--subsample_seed seeds the draw of --examples_per_class; add it")
    if args.examples_per_class is not None and args.subsample_seed is None:
        args.subsample_seed = 0
    given = tuple(flag for flag in TUNED_FLAGS if getattr(args, flag) is not None)
    # Tuning trains a few heads on the stored embeddings (seconds); an image-mode head pays a
    # backbone pass per step, so it trains once, with the given flags. So does a run whose
    # flags leave one candidate.
    choices = tuning_candidates({flag: getattr(args, flag) for flag in given})
    tune = len(choices) > 1 and not (args.no_tune or scratch or features != FEATURES_EMBEDDING)
    if args.dropout is None:
        args.dropout = 0.5 if args.model == "cnn" else 0.2
    if args.classifier is None:
        args.classifier = CLASSIFIER_ZSCORE
    if args.l2 is None:
        args.l2 = 0.0
    if args.fine_tune_learning_rate is None:
        args.fine_tune_learning_rate = args.learning_rate / 10.0
    mode = "scratch" if scratch else features
    epochs, batch_size, patience = _MODE_DEFAULTS[mode]
    args.epochs = epochs if args.epochs is None else args.epochs
    args.batch_size = batch_size if args.batch_size is None else args.batch_size
    args.patience = patience if args.patience is None else args.patience
    _validate_numbers(args)
    return TrainConfig(
        data_dir=args.data_dir,
        model_dir=args.model_dir,
        features=features,
        model=args.model,
        classifier=args.classifier,
        dropout=args.dropout,
        hidden_units=tuple(args.hidden_units),
        augment=args.augment,
        crop=args.crop,
        flip=args.flip,
        brightness=args.brightness,
        contrast=args.contrast,
        rotation=args.rotation,
        zoom=args.zoom,
        fine_tune=args.fine_tune,
        fine_tune_layers=args.fine_tune_layers,
        fine_tune_learning_rate=args.fine_tune_learning_rate,
        fine_tune_epochs=args.fine_tune_epochs,
        image_size=args.image_size,
        channels=args.channels,
        batch_norm=args.batch_norm,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        lr_schedule=args.lr_schedule,
        label_smoothing=args.label_smoothing,
        l2=args.l2,
        class_weight=args.class_weight,
        patience=args.patience,
        seed=args.seed,
        overwrite=args.overwrite,
        break_lock=args.break_lock,
        export_tflite=args.export_tflite,
        quantize=args.quantize or QUANTIZE_NONE,
        tune=tune,
        tune_fixed=given if tune else (),
        examples_per_class=args.examples_per_class,
        subsample_seed=args.subsample_seed,
        views=args.views,
    )
