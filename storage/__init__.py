"""Safe writes to the output and model dirs, on local disks and Beam/TF filesystems (``gs://``).

* :mod:`storage.locks`: one exclusive lock per output dir, held for a whole run, so two runs
  never write into one dir at once.
* :mod:`storage.staging`: a run writes into a staging folder inside its output dir; the previous
  outputs are replaced only when the new ones are complete, and only files the job's own output
  layout names are ever deleted.

Both Beam jobs and the trainer use this package; it imports neither.
"""

import schemas  # noqa: F401 - pins Keras 2 before TensorFlow resolves tf.keras
