"""``python -m pipeline`` runs the preprocessing job."""

import sys

from pipeline.preprocess import main

sys.exit(main())
