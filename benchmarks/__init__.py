"""Benchmarks of hubflow's jobs, run from the repository root as ``python -m benchmarks.<name>``.

``preprocess`` (the preprocessing job against the raw backbone, and its memory), ``predict``
(batch prediction against the SavedModel called in a loop), ``train`` (trainer throughput and
time to accuracy) and ``real_data`` (the whole product on real photos and digits).
:mod:`benchmarks.common` holds what they share. They use the product's public API only.
"""

import schemas  # noqa: F401 - pins Keras 2 before any benchmark imports TensorFlow
