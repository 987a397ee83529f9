"""hubflow's Beam jobs: preprocessing (label CSVs -> TFRecords) and batch prediction.

This package is what Dataflow workers import; importing ``schemas`` first pins Keras 2 before
TensorFlow loads.
"""

import os

import schemas  # noqa: F401 - pins Keras 2 before TensorFlow resolves tf.keras

# TensorFlow's C++ start-up chatter drowns the job's own progress lines; users can override.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
