"""Models of the trainer: a classifier head, a head on a Hub backbone, small nets from scratch.

All models are tf_keras (Keras 2) models: ``hub.KerasLayer`` only works there. The backbone is
called with ``training=False`` always, so its batch-norm layers stay in inference mode, also
while its top layers are fine-tuned.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import tensorflow as tf
import tf_keras

from backbones import composite
from backbones.hub import keras_layer
from schemas import serving
from schemas.backbones import BackboneSpec
from training import schedules
from training.config import CLASSIFIER_COSINE, TrainConfig

_LOGGER = logging.getLogger(__name__)
CROSS_ENTROPY = "cross_entropy"  # metric: the loss without label smoothing and L2 terms
# --classifier cosine: the unit-length embedding is scaled by this before the output layer, so
# the starting logits (cosine similarities to the class means) are scaled as a softmax needs.
# Measured (20, 30, 50) on hymenoptera, cats-vs-dogs-2k and MNIST embeddings (README).
COSINE_SCALE = 30.0


def _regularizer(l2: float):
    return tf_keras.regularizers.L2(l2) if l2 > 0 else None


def head_layers(num_classes: int, config: TrainConfig) -> list[tf_keras.layers.Layer]:
    """dropout -> optional hidden ReLU layers (each followed by dropout) -> softmax.

    The output layer starts at zero (BiT): the first predictions are uniform, no random bias.
    """
    layers: list[tf_keras.layers.Layer] = []
    if config.dropout > 0:
        layers.append(tf_keras.layers.Dropout(config.dropout, seed=config.seed))
    for units in config.hidden_units:
        layers.append(
            tf_keras.layers.Dense(
                units, activation="relu", kernel_regularizer=_regularizer(config.l2)
            )
        )
        if config.dropout > 0:
            layers.append(tf_keras.layers.Dropout(config.dropout, seed=config.seed))
    layers.append(
        tf_keras.layers.Dense(
            num_classes,
            activation="softmax",
            kernel_initializer="zeros",
            kernel_regularizer=_regularizer(config.l2),
            name="probabilities",
        )
    )
    return layers


def _apply(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def embedding_head(
    embedding_dim: int,
    num_classes: int,
    mean: np.ndarray,
    std: np.ndarray,
    config: TrainConfig,
    class_means: np.ndarray | None = None,
) -> tf_keras.Model:
    """Raw embedding ``[D]`` -> normalisation -> head -> probabilities.

    ``--classifier zscore``: z-score with the tf.Transform statistics, output weights from
    zero. ``--classifier cosine``: the embedding scaled to unit length (times
    :data:`COSINE_SCALE`), and the output weights start at ``class_means``
    (:func:`imprinted_kernel`; "imprinting", Qi et al. 2018) when the output layer sits on the
    embedding: the head starts as a nearest-class-mean classifier, and training moves it only
    while the eval loss improves.
    """
    inputs = tf_keras.Input([embedding_dim], name="embedding")
    if config.classifier == CLASSIFIER_COSINE:
        x = tf_keras.layers.UnitNormalization(name="normalize")(inputs)
        x = tf_keras.layers.Rescaling(COSINE_SCALE, name="scale")(x)
    else:
        x = tf_keras.layers.Normalization(mean=mean, variance=np.square(std), name="normalize")(
            inputs
        )
    head = tf_keras.Model(inputs, _apply(head_layers(num_classes, config), x), name="head")
    if config.classifier == CLASSIFIER_COSINE and class_means is not None:
        if not config.hidden_units:  # assigned, not an initializer: kept out of the model config
            head.get_layer("probabilities").kernel.assign(class_means)
    return head


def start_kernel(
    config: TrainConfig, embeddings: np.ndarray, labels: np.ndarray, num_classes: int
) -> np.ndarray | None:
    """The output weights a head of ``config`` starts from, given the train embeddings: the
    imprinted class means for ``--classifier cosine``, None (zeros) otherwise."""
    if config.classifier != CLASSIFIER_COSINE:
        return None
    return imprinted_kernel(embeddings, labels, num_classes)


def imprinted_kernel(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[D, num_classes]``: each class's mean unit-length embedding, scaled to unit length.

    A class without examples gets a zero column (uniform logits from it).
    """
    units = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    kernel = np.zeros([embeddings.shape[1], num_classes], np.float32)
    for c in range(num_classes):
        members = units[labels == c]
        if len(members):
            mean = members.mean(axis=0)
            kernel[:, c] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return kernel


def image_classifier(
    spec: BackboneSpec, head: tf_keras.Model, *, trainable: bool = False
) -> tf_keras.Model:
    """Image ``[S, S, 3]`` in [0, 1] -> backbone (inference mode) -> ``head``."""
    inputs = tf_keras.Input([spec.image_size, spec.image_size, 3], name="image")
    features = keras_layer(spec, trainable)(inputs, training=False)
    return tf_keras.Model(inputs, head(features), name="image_classifier")


def scratch_model(num_classes: int, input_shape: tuple[int, int, int], config: TrainConfig):
    """Small nets trained from scratch (e.g. digits).

    * ``linear``: flatten -> softmax (28*28*1*10 + 10 = 7,850 parameters on MNIST).
    * ``dnn``: flatten -> 400 ReLU -> dropout -> 100 ReLU -> dropout -> softmax.
    * ``cnn``: (conv 5x5 -> [batch norm] -> ReLU -> max-pool) x 2 -> dense 300 -> dropout -> softmax.
    """
    reg = _regularizer(config.l2)
    inputs = tf_keras.Input(input_shape, name="image")
    x = inputs
    if config.model == "linear":
        x = tf_keras.layers.Flatten()(x)
    elif config.model == "dnn":
        x = tf_keras.layers.Flatten()(x)
        for units in (400, 100):
            x = tf_keras.layers.Dense(units, activation="relu", kernel_regularizer=reg)(x)
            x = tf_keras.layers.Dropout(config.dropout, seed=config.seed)(x)
    elif config.model == "cnn":
        for filters in (32, 64):
            x = tf_keras.layers.Conv2D(
                filters, 5, padding="same", use_bias=not config.batch_norm, kernel_regularizer=reg
            )(x)
            if config.batch_norm:
                x = tf_keras.layers.BatchNormalization()(x)
            x = tf_keras.layers.ReLU()(x)
            x = tf_keras.layers.MaxPooling2D(2)(x)
        x = tf_keras.layers.Flatten()(x)
        x = tf_keras.layers.Dense(300, activation="relu", kernel_regularizer=reg)(x)
        x = tf_keras.layers.Dropout(config.dropout, seed=config.seed)(x)
    else:
        raise ValueError(f"--model: unknown model {config.model!r}")
    outputs = tf_keras.layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=reg, name="probabilities"
    )(x)
    return tf_keras.Model(inputs, outputs, name=config.model)


def _layer_of(variable: tf.Variable) -> str:
    """The layer a backbone variable belongs to: its name without the last path component."""
    name = variable.name.split(":")[0]
    return name.rsplit("/", 1)[0] if "/" in name else re.sub(r"_\d+$", "", name)


def backbone_layers(model: tf_keras.Model) -> list[tf_keras.layers.Layer]:
    """The model's backbone layers: ``backbone``, or one ``backbone_<i>`` per part of a
    composite backbone (:func:`fine_tune_model`)."""
    return [
        layer
        for layer in model.layers
        if layer.name == "backbone" or re.fullmatch(r"backbone_\d+", layer.name)
    ]


def frozen_backbone_variables(model: tf_keras.Model, top_layers: int) -> list[tf.Variable]:
    """Backbone variables to keep frozen when only the top ``top_layers`` layers are tuned.

    Layers are the backbone's variable groups in creation order (input side first); 0 = tune all.
    A composite backbone's parts each tune their own top ``top_layers`` layers.
    """
    if top_layers <= 0:
        return []
    frozen: list[tf.Variable] = []
    for backbone in backbone_layers(model):
        variables = list(backbone.trainable_weights)
        order: list[str] = []
        for v in variables:
            layer = _layer_of(v)
            if layer not in order:
                order.append(layer)
        tuned = set(order[-top_layers:])
        frozen += [v for v in variables if _layer_of(v) not in tuned]
    return frozen


class PartiallyFrozenModel(tf_keras.Model):
    """A functional model whose ``train_step`` leaves some trainable variables untouched."""

    def __init__(self, *args, frozen: list[tf.Variable] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._frozen_refs = {v.ref() for v in (frozen or [])}

    def train_step(self, data):
        x, y, sample_weight = tf_keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
        variables = [v for v in self.trainable_variables if v.ref() not in self._frozen_refs]
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return self.compute_metrics(x, y, y_pred, sample_weight)


def fine_tune_model(spec: BackboneSpec, head: tf_keras.Model, config: TrainConfig):
    """The image classifier with the backbone unfrozen (its top ``fine_tune_layers`` layers).

    A composite backbone (``--backbone a,b``) is stitched from its parts here, one layer per
    part (``backbone_<i>``), so that each part's top layers can be told apart and tuned; the
    features are those of the composite SavedModel (:func:`backbones.composite.stitch`).
    """
    inputs = tf_keras.Input([spec.image_size, spec.image_size, 3], name="image")
    if spec.parts:
        layers = [
            keras_layer(part, trainable=True, name=f"backbone_{i}")
            for i, part in enumerate(spec.parts)
        ]
        features = composite.stitch(
            inputs,
            [
                (_inference_mode(layer), part.image_size)
                for layer, part in zip(layers, spec.parts, strict=True)
            ],
        )
    else:
        layers = [keras_layer(spec, trainable=True)]
        features = layers[0](inputs, training=False)
    outputs = head(features)
    probe = tf_keras.Model(inputs, outputs)
    frozen = frozen_backbone_variables(probe, config.fine_tune_layers)
    model = PartiallyFrozenModel(inputs, outputs, frozen=frozen, name="fine_tune")
    total = sum(len(layer.trainable_weights) for layer in layers)
    _LOGGER.info("fine-tuning %d of %d backbone variables", total - len(frozen), total)
    return model


def _inference_mode(layer):
    return lambda x: layer(x, training=False)


def loss(num_classes: int, label_smoothing: float):
    """Sparse categorical cross-entropy, with label smoothing when asked for."""
    if label_smoothing == 0:
        return tf_keras.losses.SparseCategoricalCrossentropy()

    def smoothed(y_true, y_pred):
        y = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), num_classes)
        return tf_keras.losses.categorical_crossentropy(y, y_pred, label_smoothing=label_smoothing)

    return smoothed


def optimizer(name: str, learning_rate):
    """``adam``, ``sgd`` (momentum 0.9) or ``rmsprop`` with a rate or a schedule."""
    if name == "sgd":
        return tf_keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "rmsprop":
        return tf_keras.optimizers.RMSprop(learning_rate)
    return tf_keras.optimizers.Adam(learning_rate)


def compile_model(model, config: TrainConfig, num_classes: int, learning_rate: float, steps: int):
    """Compiles with the configured optimizer and schedule (over ``steps``), loss and metrics."""
    k = serving.top_k(num_classes)
    model.compile(
        optimizer=optimizer(
            config.optimizer, schedules.make_schedule(config.lr_schedule, learning_rate, steps)
        ),
        loss=loss(num_classes, config.label_smoothing),
        metrics=[
            tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            tf_keras.metrics.SparseTopKCategoricalAccuracy(k=k, name="top_k_accuracy"),
            tf_keras.metrics.SparseCategoricalCrossentropy(name=CROSS_ENTROPY),
        ],
    )
