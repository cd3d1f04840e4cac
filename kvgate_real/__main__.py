"""``python -m kvgate_real up|down|status``."""

import sys

from kvgate_real.cli import main

sys.exit(main())
