"""``python -m medautolabel.training`` (and ``torchrun -m medautolabel.training``) = ``medautolabel train``."""

import sys

from .cli import main

sys.exit(main())
