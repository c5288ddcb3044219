"""``python -m ndlowrank``: the same command line as ``ndlowrank``."""

import sys

from .cli import main

sys.exit(main())
