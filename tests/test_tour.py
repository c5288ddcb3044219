"""``python -m ndlowrank tour`` runs and prints its table."""

from __future__ import annotations

import subprocess
import sys


def test_quick_tour_runs_and_prints_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "ndlowrank", "tour"], capture_output=True, text=True, timeout=300, check=True
    )
    out = result.stdout
    assert "sthosvd(tol=0.1)" in out and "hooi(ranks=(16,16,3,3))" in out
    assert "A Tucker delta for that kernel" in out
    assert "max |ΔW| = 0.0" in out
