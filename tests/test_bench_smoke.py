"""The benchmark runs end to end on tiny sizes and prints every row of its table.

No timing is asserted here: figures on a shared machine mean nothing in a test. The real figures
come from ``bench/run.py`` without ``--quick`` (see bench/README.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ROWS = [
    "Throughput: 40 x 1 KB",
    "Throughput: 24 x 256 KB",
    "Throughput: 4 x 4 MB",
    "archiver backfill",
    "aria2c -j 8",
    "curl -o FILE x8 (ceiling)",
    "curl -o /dev/null x8 (network)",
    "curl -o FILE x8, then sync",
    "archiver / aria2c",
    "archiver / ceiling (curl -o FILE)",
    "archiver / durable ceiling (then sync)",
    "S3: into SeaweedFS, archiver backfill vs rclone copyurl",
    "Memory: peak RSS of archiver backfill",
    "peak RSS, local disk",
    "peak RSS, S3",
    "Scale: recordings of 1 KB",
    "full pass, 200",
    "full pass, 1,000",
    "no-op pass, 200",
    "no-op pass, 1,000",
    "growth 200 -> 1,000, full",
    "growth 200 -> 1,000, no-op",
    "CPU per recording, full pass 1,000",
    "API requests per recording, 200",
    "ledger size per 100,000 rows",
    "PostgreSQL ledger: archiver run --once instances",
]


@pytest.mark.timeout(90)
def test_quick_benchmark_prints_the_whole_table(tmp_path: Path) -> None:
    tools = {t: shutil.which(t) for t in ("aria2c", "curl", "xargs", "sync")}
    tools["time"] = shutil.which("time", path="/usr/bin:/bin")  # GNU time, not the shell's
    missing = [tool for tool, found in tools.items() if found is None]
    if missing:
        # .ci/run installs them (Debian: aria2, curl, time); a silent skip would hide the gap.
        pytest.fail(f"the benchmark's peers are not installed: {', '.join(missing)}")
    env = {k: v for k, v in os.environ.items() if k != "ARCHIVER_CONFIG"}
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--skip-s3", "--results", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    for row in ROWS:
        assert row in table, f"row {row!r} missing from:\n{table}"
    assert table.count("skipped (--skip-s3)") == 2  # the S3 throughput and memory rows

    [raw] = tmp_path.glob("*-quick.json")
    doc = json.loads(raw.read_text())
    assert doc["table"] == table.split("\n\n(raw figures")[0].splitlines()
    assert {e["count"] for e in doc["throughput"]} == {40, 24, 4}
    assert set(doc["scale"]["runs"]) == {"200", "1000"}
    # The scratch directory is gone: only the JSON stays.
    assert [p.name for p in tmp_path.iterdir()] == [raw.name]
