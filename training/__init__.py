"""hubflow's trainer: a classifier head on bottleneck features or raw images (issue 3)."""

import os

# hub.KerasLayer is a tf_keras layer; pin tf.keras to Keras 2 before anything resolves it.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
