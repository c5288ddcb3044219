"""``python -m benchmarks.quality [--quick]``."""

from benchmarks.quality.run import main

main()
