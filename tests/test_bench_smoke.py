"""The checkpoint benchmark runs end to end at a tiny size and reports all ten figures.

A benchmark is not a test: nothing here checks a timing, only that every figure is there
and is a finite positive ratio computed from real measurements.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import REPO

FIGURES = [
    "stall_vs_torch_save",
    "stall_vs_memory_copy",
    "stall_vs_dcp",
    "durable_vs_dcp",
    "step_time_while_persisting",
    "local_persist_vs_raw_write",
    "s3_persist_vs_boto3",
    "s3_restore_vs_boto3",
    "restore_vs_best",
    "save_peak_memory_vs_state",
]


@pytest.mark.slow
def test_benchmark_reports_every_figure(tmp_path, child_env):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_checkpoint.py"), "--size-mib", "8",
         "--repeats", "1", "--s3", "--quiet", "--json", str(out), "--dir", str(tmp_path)],
        cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    figures = result["figures"]
    assert list(figures) == FIGURES
    for key in FIGURES:
        ratio = figures[key]["ratio"]
        assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0, (key, ratio)
        assert figures[key]["target"].split()[0] in ("<=", ">=")
    step = figures["step_time_while_persisting"]
    assert step["p50_ratio"] > 0 and step["p99_ratio"] > 0
    assert result["config"]["payload_bytes"] > result["config"]["state_bytes"] * 0.9
    assert result["machine"]["nproc"] >= 1
    # The printed table names every figure, in order.
    for i, _key in enumerate(FIGURES, 1):
        assert f"\n{i}  " in res.stdout
    # Nothing is left behind in the benchmark's working directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


@pytest.mark.slow
def test_sharded_benchmark_reports_ratios_against_dcp(tmp_path, child_env):
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_sharded.py"), "--quick",
         "--dir", str(tmp_path)],
        cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    for label in ("stall", "durable", "restore same size", "restore 2 -> 1"):
        line = next(ln for ln in res.stdout.splitlines()
                    if ln.strip().startswith(label + " ") and "spotrun / dcp" in ln)
        ratio = float(re.findall(r"([\d.]+)x", line)[0])
        assert math.isfinite(ratio) and ratio > 0, line
    floor = next(ln for ln in res.stdout.splitlines() if "stall / copy floor" in ln)
    assert float(re.findall(r"([\d.]+)x", floor)[0]) > 0, floor
