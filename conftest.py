"""Root pytest configuration: doctests that need torch are skipped where torch is not installed."""

import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("torch") is None:
    collect_ignore_glob += ["ndlowrank/nn/*", "docs/adapters.md"]
