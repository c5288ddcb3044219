"""``python -m benchmarks``: run every benchmark and refresh RESULTS.md (see :mod:`benchmarks.run`)."""

import sys

from benchmarks.run import main

sys.exit(main())
