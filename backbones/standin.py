"""A stand-in backbone: a small random-weight conv net saved as a Hub-format feature-vector model.

Tests (and anyone without network access who wants a fast model) use it to exercise the same
loading path as a real Hub model. It has trainable and batch-norm variables like a real backbone,
so fine-tuning tests test something (a bare ``tf.Module`` would expose none through
``hub.KerasLayer``).
"""

from __future__ import annotations

import os

STANDIN_SIZE = 64
STANDIN_DIM = 32


def save_standin_backbone(path: str, size: int = STANDIN_SIZE, dim: int = STANDIN_DIM) -> str:
    """Saves a small random-weight tf_keras conv net as a Hub-format feature-vector SavedModel.

    Input ``[N, size, size, 3]`` float32 in [0, 1], output ``[N, dim]``; it has trainable and
    batch-norm variables like a real backbone. Written to a temp dir, then renamed into place.
    """
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input([size, size, 3])
    x = tf_keras.layers.Conv2D(16, 3, strides=2, padding="same")(inputs)
    x = tf_keras.layers.BatchNormalization()(x)
    x = tf_keras.layers.ReLU()(x)
    x = tf_keras.layers.Conv2D(dim, 3, strides=2, padding="same", activation="relu")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    colour = tf_keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = tf_keras.layers.Dense(dim)(tf_keras.layers.Concatenate()([x, colour]))
    model = tf_keras.Model(inputs, outputs)
    tmp = f"{path}.tmp-{os.getpid()}"
    tf.saved_model.save(model, tmp)
    os.replace(tmp, path)
    return path
