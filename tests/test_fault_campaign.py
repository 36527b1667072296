"""The whole fault campaign (benchmarks/fault_campaign.py) as a slow test: 200 kills, ENOSPC, live readers."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fault_campaign_loses_nothing_committed():
    done = subprocess.run([sys.executable, "benchmarks/fault_campaign.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    total = done.stdout.strip().splitlines()[-1]
    kills = int(total.split("TOTAL: ")[1].split(" kills")[0])
    assert kills >= 200 and "0 committed snapshots lost, 0 silent errors" in total, total
