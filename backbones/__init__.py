"""Feature-vector backbones: the preset registry, Hub/SavedModel loading, the built-in cache,
the offline EfficientNet-Lite build with its torch-pickle weight reader, and the input contract
in TensorFlow. Both the Beam jobs and the trainer use this package; it imports neither.
"""

import schemas  # noqa: F401 - pins Keras 2 before TensorFlow resolves tf.keras
