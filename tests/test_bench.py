"""`make bench` end to end: benchmarks/bench.py as a process, one timed epoch of each loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_interleaves_the_loops_and_reports_the_ratio(tmp_path):
    out = tmp_path / "cpu.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--epochs", "1", "--device", "cpu",
         "--precision", "fp32", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    reference, project = report["loops"]
    assert (reference["loop"], project["loop"], project["precision"]) == ("reference", "project", "fp32")
    # 1 warm-up epoch each, then the project's timed epoch with one reference epoch right after it
    assert len(reference["epoch_seconds"]) == len(project["epoch_seconds"]) == 1
    assert project["reference_epoch_seconds"] == reference["epoch_seconds"]
    assert project["ratio_vs_reference"] == pytest.approx(
        reference["epoch_seconds"][0] / project["epoch_seconds"][0])
    assert reference["peak_memory_bytes"] > 0 and project["peak_memory_bytes"] > 0
    assert report["matmul_gflops"]["fp32"] > 0
    assert f"{project['ratio_vs_reference']:.2f}x" in run.stdout
