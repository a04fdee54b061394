"""Issue 13 item 1: a segment ends when its instance went, not when the controller noticed.

The EC2 controller runs against moto (the fixtures of test_launch_ec2.py) with its clock
jumping three hours while the first instance is gone: a controller that was down that long
must not bill those hours.
"""

from __future__ import annotations

import time

import pytest
from test_launch_ec2 import World, controller, options, storage, world  # noqa: F401 - fixtures

from spotrun.launch.controller import Ec2Controller
from spotrun.launch.ec2 import transition_time
from spotrun.records.instance import InstanceInfo
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

OUTAGE_S = 3 * 3600.0


def test_transition_time_parses_ec2_reasons():
    assert transition_time("User initiated (2023-11-14 22:13:20 GMT)") == 1_700_000_000.0
    assert transition_time("Service initiated (2023-11-14 22:13:20 UTC)") == 1_700_000_000.0
    assert transition_time("") is None and transition_time("User initiated") is None


@pytest.mark.slow  # one moto EC2 world (several seconds to set up on a loaded machine)
def test_controller_outage_bills_no_phantom_hours(world: World, storage: Storage) -> None:  # noqa: F811
    """Three interrupted segments, each noticed three hours late, each with one kind of
    evidence of when it went; then a fourth that finishes."""
    kinds = ["transition", "deadline", "wrapper"]
    now = [time.time()]
    seen: list[str] = []
    begun: dict[str, float] = {}

    def act(ctl: Ec2Controller) -> None:
        cur = ctl.state.current
        assert cur is not None
        if cur.instance_id in seen:
            return
        seen.append(cur.instance_id)
        if len(seen) > len(kinds):
            storage.write_bytes("done.json", b"{}")
            return
        evidence = kinds[len(seen) - 1]
        t0 = begun[cur.instance_id] = now[0]
        ledger = Ledger(storage)
        sid = cur.segment_id
        ledger.segment_started(segment_id=sid, instance=InstanceInfo(), started_at=t0 + 2, source="wrapper")
        if evidence == "deadline":
            ledger.notice_received(segment_id=sid, source="ec2", action="terminate", notice_time=t0 + 8,
                                   detected_at=t0 + 10, deadline=t0 + 128)
        ledger.segment_ended(segment_id=sid, reason="interrupted", ended_at=t0 + 30, source="wrapper")
        world.spot_interrupt(cur.instance_id)
        if evidence == "transition":
            # EC2's own time of the termination: an hour into the outage here.
            world.instance(cur.instance_id)._reason = (
                "Service initiated (" + time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0 + 3600)) + " GMT)")
        else:
            world.instance(cur.instance_id)._reason = ""  # EC2 gave no transition time
        now[0] += OUTAGE_S  # the controller was down; it notices three hours late

    ctl = controller(world, storage, options(world, storage, max_interruptions=10), act)
    ctl.clock = lambda: now[0]
    assert ctl.run().status == "finished"

    ends = {r["segment_id"]: r["ended_at"] for r in Ledger(storage).records()
            if r["event"] == "segment_ended" and r["source"] == "launcher"}
    for iid, evidence in zip(seen, kinds, strict=False):
        t0 = begun[iid]
        expected = {"transition": int(t0 + 3600), "deadline": t0 + 128, "wrapper": t0 + 30}[evidence]
        assert ends[iid] == pytest.approx(expected, abs=0.01), evidence
        seg = next(s for s in ctl.state.segments if s.segment_id == iid)
        assert seg.ended_at == ends[iid]
