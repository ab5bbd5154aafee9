"""``python -m medautolabel.evaluation PRED REF -o REPORT_DIR``."""

import sys

from .cli import main

sys.exit(main())
