"""``python -m demo`` runs the one-command demo."""

import sys

from demo.run import main

sys.exit(main())
