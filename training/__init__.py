"""hubflow's trainer: a classifier head on bottleneck features or raw images, or a small net
from scratch; evaluation; a hermetic serving export."""

import schemas  # noqa: F401 - pins Keras 2 before TensorFlow resolves tf.keras
