"""``python -m medautolabel.training`` (and ``torchrun -m medautolabel.training``) = ``medautolabel train``."""

import sys

from medautolabel.cli.train import main

sys.exit(main())
