"""``python -m medautolabel`` runs the ``medautolabel`` command."""

import sys

from .cli import main

sys.exit(main())
