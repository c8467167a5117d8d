"""Keep the benchmark working: run its --quick path once (figures checked for shape, never for speed)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.bench


def test_quick_benchmark_runs(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    sections = {row["section"] for row in rows}
    assert sections == {"write", "generate", "end to end", "one database", "staging", "staged/data", "task size", "scheduler",
                        "auto size", "stragglers", "plan", "merge MB/s", "stage-out ms", "memory MB", "read scan", "read 256/s"}
    assert all(row["rate"] > 0 for row in rows)
    contenders = {row["contender"] for row in rows}
    assert {"unidask shard", "seed shared db", "np.savetxt per file", "raw sequential bytes",
            "bare multiprocessing loop", "file per unitary", "cp", "scipy rvs per call",
            "np.load of the .npy", "memory-mapped .npy", "seed's script"} <= contenders
    seed = [row for row in rows if row["contender"] == "seed shared db"]
    assert all("locked" in row and "stall" in row for row in seed)   # its errors and stalls are counted
