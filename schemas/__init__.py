"""hubflow's data contract: feature keys, TFRecord layout, label-CSV format, backbones, manifest.

Both the Beam pipeline and the trainer import this package; nothing else in the code base spells
a feature key, a split name or a manifest field.
"""

import os

# hub.KerasLayer is a tf_keras layer; pin tf.keras to Keras 2 before anything resolves it.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
