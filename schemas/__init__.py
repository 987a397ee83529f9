"""hubflow's contract: feature keys, TFRecord layout, label-CSV format, error records, the
backbone spec, the manifest, the serving signature and the command-line conventions.

Every other package imports this one, so this is the one place that pins Keras 2:
``hub.KerasLayer`` is a tf_keras layer, and ``tf.keras`` is fixed for the process the first time
anything resolves it. Each package's ``__init__`` imports ``schemas`` before anything else.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
