"""hubflow's Beam preprocessing job: label CSVs -> re-encoded JPEGs + frozen-backbone embeddings.

This package is what Dataflow workers import, so it pins Keras 2 before TensorFlow loads.
"""

import os

# hub.KerasLayer is a tf_keras layer; pin tf.keras to Keras 2 before anything resolves it.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ start-up chatter drowns the job's own progress lines; users can override.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
