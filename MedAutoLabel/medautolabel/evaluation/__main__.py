"""``python -m medautolabel.evaluation PRED REF -o REPORT_DIR``."""

import sys

from medautolabel.cli.evaluate import main

sys.exit(main())
