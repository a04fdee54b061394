"""scripts/bench_recovery.py: its ledger arithmetic (in process) and a --quick run end to end.

A benchmark is not a test: nothing here checks a timing, only that the figures are computed
from the records they name and that the printed table has its rows.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

from spotrun.records.events import parse_records
from spotrun.records.instance import InstanceInfo
from spotrun.records.ledger import Ledger
from spotrun.storage import open_storage


def _bench():
    spec = importlib.util.spec_from_file_location("bench_recovery", REPO / "scripts" / "bench_recovery.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _attempt(ledger: Ledger, group: str, at: float, nodes: tuple[int, ...] = (0, 1, 2)) -> None:
    for i in nodes:
        sid = f"{group}-n{i}"
        ledger.segment_started(segment_id=sid, instance=InstanceInfo(instance_id=sid), started_at=at + 0.1 * i,
                               source="launcher", group=group, node=i)


def test_recoveries_split_the_time_from_the_ledger(tmp_path):
    """With the new records: t0 from recovery_started, the split from restore_started_at and
    restore_s, bytes by source; without them (today's records): the launcher's line for the
    loss and one "start..step" figure."""
    bench = _bench()
    ledger = Ledger(open_storage(str(tmp_path)))
    _attempt(ledger, "sim-1", 100.0)
    ledger.training_resumed(segment_id="sim-1-n0", step=0, process_started_at=100.5, first_step_at=103.0)
    # A node vanished at 110 (the launcher said so at 110.3); the next attempt replaced it: only
    # the replacement is a new segment, rank 0 is a survivor and keeps its segment id.
    _attempt(ledger, "sim-2", 112.0, nodes=(2,))
    ledger.segment_ended(segment_id="sim-1-n2", reason="interrupted", ended_at=110.5, source="launcher")
    ledger.recovery_started(segment_id="sim-2", lost_at=110.0, mode="replace", lost=["sim-1-n2"],
                            kept=["sim-1-n0", "sim-1-n1"], instances_started=1, capacity_at=111.0)
    ledger.training_resumed(segment_id="sim-1-n0", step=8, process_started_at=112.5, first_step_at=120.0,
                            restore_started_at=115.0, restore_s=2.0, bytes_local=300, bytes_peer=100, bytes_url=0)
    # A notice at 130 (no recovery_started: an older launcher), next attempt at 133.
    _attempt(ledger, "sim-3", 133.0)
    ledger.training_resumed(segment_id="sim-3-n0", step=12, process_started_at=133.5, first_step_at=141.0)
    lines = [(110.3, "spotrun: sim-1-n2 (node 2) vanished without notice: SIGKILL of its processes"),
             (130.0, "spotrun: spot interruption notice for sim-2-n0 (node 0): SIGTERM in 5s")]
    records, warnings = parse_records(ledger.records())
    assert not warnings
    loss, notice = bench.recoveries(records, lines)

    assert (loss["kind"], loss["from"], loss["to"], loss["recorded"]) == ("loss", "sim-1", "sim-2", True)
    assert loss["total"] == pytest.approx(10.0)           # 110 -> 120
    assert loss["to_capacity"] == pytest.approx(1.0)      # 110 -> 111
    assert loss["boot"] == pytest.approx(1.2)             # 111 -> last node started 112.2
    assert loss["start_rdzv"] == pytest.approx(2.8)       # 112.2 -> 115
    assert loss["restore"] == pytest.approx(2.0)
    assert loss["restore_to_step"] == pytest.approx(3.0)  # 117 -> 120
    assert (loss["bytes_local"], loss["bytes_peer"], loss["bytes_url"]) == (300, 100, 0)
    assert (loss["instances_started"], loss["kept"]) == (1, ["sim-1-n0", "sim-1-n1"])
    assert loss["gone_to_step"] == pytest.approx(9.5)     # the lost machine booked gone 110.5 -> 120

    assert (notice["kind"], notice["recorded"]) == ("notice", False)
    assert notice["total"] == pytest.approx(11.0)         # the launcher's line at 130 -> 141
    assert notice["to_capacity"] == pytest.approx(3.2)    # -> the last node started
    assert notice["restore"] is None and notice["bytes_url"] is None
    assert notice["start_to_step"] == pytest.approx(141.0 - 133.2)
    assert notice["gone_to_step"] is None  # no record says which machine was lost


@pytest.mark.slow
def test_quick_run_replaces_the_lost_node_and_reads_nothing_from_the_run_url(tmp_path, child_env):
    """The suite's one 3-node replace through the launcher: one machine started, two kept,
    every restored byte from a local or a peer copy (the 2-node chains cover the rest)."""
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_recovery.py"), "--quick", "--paths", "replace",
         "--no-exact", "--json", str(out), "--dir", str(tmp_path / "work")],
        cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert re.search(r"^case +loss +path +total +capacity", res.stdout, re.M), res.stdout
    row = re.search(r"^fsdp +notice +replace +([0-9.]+) ", res.stdout, re.M)
    assert row and float(row.group(1)) > 0, res.stdout
    assert "Targets (issue 22)" in res.stdout
    assert re.search(r"^ +yes +fsdp notice \(replace\): starts exactly 1 machine, keeps 2", res.stdout, re.M), \
        res.stdout
    assert re.search(r"^ +yes +fsdp notice \(replace\): 0 checkpoint bytes from the run URL", res.stdout, re.M), \
        res.stdout
    result = json.loads(out.read_text())
    assert [(r["case"], r["kind"], r["path"], r["n"]) for r in result["table"]] == [("fsdp", "notice", "replace", 1)]
    (run,) = result["runs"]
    assert run["rc"] == 0 and len(run["digest"]) == 64
    # Run folders and logs are gone; the work directory is left empty.
    assert list((tmp_path / "work").iterdir()) == []
    # --report prints the same table and targets from the saved figures, running nothing.
    again = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_recovery.py"), "--report", str(out)],
        cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=120,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    targets = [line for line in res.stdout.splitlines() if re.match(r" +(yes|NO|-) +fsdp", line)]
    assert targets and targets == [line for line in again.stdout.splitlines()
                                   if re.match(r" +(yes|NO|-) +fsdp", line)]
    assert row.group(0) in again.stdout
