"""Issue 14 item 6: --max-cost and --max-wait (spotrun.launch.limits), against real ledgers."""

from __future__ import annotations

import json
import logging
import time

import pytest

from spotrun.cli.launch import parse_deadline
from spotrun.cost import report_for_run
from spotrun.cost.prices import load_snapshot
from spotrun.errors import ConfigError
from spotrun.launch.limits import (
    Booting,
    CostGuard,
    Limits,
    WaitClock,
    fmt_wait,
    limits_status,
    parse_duration,
    spend_so_far,
)
from spotrun.records.instance import InstanceInfo
from spotrun.records.launch_state import LaunchState, Segment, save_state
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

#: What the shipped snapshot charges a simulated g5.xlarge spot hour (offline pricing).
SPOT = load_snapshot()["on_demand"]["g5.xlarge"] * 0.3


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTRUN_CACHE_DIR", str(tmp_path / "cache"))


def _run(url: str, started: float, *, nodes: int = 1, instance_type: str | None = "g5.xlarge",
         done_before: float = 0.0) -> Storage:
    """A running launch: ``nodes`` open segments since ``started`` (one attempt), after an
    earlier interrupted segment of ``done_before`` seconds when that is > 0."""
    storage = Storage(url)
    ledger = Ledger(storage)
    state = LaunchState(mode="local", run_id="r1", created_at=started - done_before - 10, status="running")
    if done_before:
        old = InstanceInfo(cloud="simulated", instance_id="old", instance_type=instance_type,
                           region="us-east-1", availability_zone="us-east-1a", market="spot")
        t = started - done_before - 5
        ledger.segment_started(segment_id="old", instance=old, started_at=t, source="launcher")
        ledger.segment_ended(segment_id="old", reason="interrupted", ended_at=t + done_before, source="launcher")
        state.segments.append(Segment(segment_id="old", instance_id="old", instance_type=instance_type,
                                      market="spot", started_at=t, ended_at=t + done_before,
                                      end_reason="interrupted"))
    for n in range(nodes):
        sid = f"seg-{n}"
        info = InstanceInfo(cloud="simulated", instance_id=sid, instance_type=instance_type,
                            region="us-east-1", availability_zone="us-east-1a", market="spot")
        group = {} if nodes == 1 else {"group": "att-1", "node": n}
        ledger.segment_started(segment_id=sid, instance=info, started_at=started, source="launcher", **group)
        state.segments.append(Segment(segment_id=sid, instance_id=sid, instance_type=instance_type,
                                      market="spot", started_at=started))
    save_state(storage, state)
    return storage


# -- parsing and validation ------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [
    ("90s", 90), ("45m", 2700), ("6h", 21600), ("2d", 172800), ("120", 120), ("1.5h", 5400),
    ("1h30m", 5400), (" 10m ", 600),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "0", "0s", "-5m", "5x", "nan", "inf", "1e3", "h"])
def test_parse_duration_errors_are_one_line_and_name_the_flag(text):
    with pytest.raises(ConfigError) as err:
        parse_duration(text)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("--max-wait") and "6h" in msg


def test_parse_deadline_shares_the_grammar():
    assert parse_deadline("90m", now=1000.0) == 1000.0 + 5400
    assert parse_deadline("1h30m", now=0.0) == 5400
    assert parse_deadline("2025-06-01T12:00Z") == 1748779200.0
    for bad in ("soon", "90"):  # a deadline needs a unit or a date: "90" means nothing
        with pytest.raises(ConfigError, match="--deadline"):
            parse_deadline(bad)


@pytest.mark.parametrize("limits,flag", [
    (Limits(max_cost_usd=0), "--max-cost"), (Limits(max_cost_usd=-3.0), "--max-cost"),
    (Limits(max_cost_usd=float("nan")), "--max-cost"), (Limits(max_cost_usd=float("inf")), "--max-cost"),
    (Limits(max_cost_usd=True), "--max-cost"), (Limits(max_cost_usd="12"), "--max-cost"),
    (Limits(max_wait_s=0), "--max-wait"), (Limits(max_wait_s=-1), "--max-wait"),
])
def test_limits_validate(limits, flag):
    with pytest.raises(ConfigError) as err:
        limits.validate()
    assert str(err.value).startswith(flag) and "\n" not in str(err.value) and "greater than 0" in str(err.value)


def test_limits_json_round_trip_and_options():
    lim = Limits(max_cost_usd=12.5, max_wait_s=3600.0).validate()
    assert Limits.from_dict(json.loads(json.dumps(lim.to_dict()))) == lim
    # In the launch state's options: nested (options["limits"]) or flat fields.
    assert Limits.from_options({"limits": lim.to_dict(), "region": "x"}) == lim
    assert Limits.from_options({"max_cost_usd": 12.5, "max_wait_s": 3600.0}) == lim
    assert Limits.from_options({}) == Limits() and not Limits().any
    assert Limits.from_options(None) == Limits()
    with pytest.raises(ConfigError, match="--max-cost"):
        Limits.from_options({"limits": {"max_cost_usd": -1}})


def test_fmt_wait():
    assert [fmt_wait(s) for s in (0, 45, 90, 65, 3600, 3720, 5400, 86400, 2 * 86400 + 3 * 3600)] == [
        "0s", "45s", "1m 30s", "1m 05s", "1h", "1h 02m", "1h 30m", "1d", "2d 03h"]


# -- spend and the cost guard -----------------------------------------------------------------


def test_spend_so_far_is_what_status_prices(tmp_path):
    now = time.time()
    storage = _run(str(tmp_path / "run"), now - 3600.0, done_before=1800.0)
    spent = spend_so_far(storage, now=now)
    # The interrupted half hour and the running hour, priced to now from the snapshot.
    assert spent == pytest.approx(SPOT * 1.5)
    assert spent == pytest.approx(report_for_run(storage, offline=True, now=now).totals()["cost_usd"])


def test_spend_so_far_counts_every_running_node(tmp_path):
    now = time.time()
    storage = _run(str(tmp_path / "run"), now - 3600.0, nodes=3)
    # All three open segments of the attempt run to now (not only the launch state's last).
    assert spend_so_far(storage, now=now) == pytest.approx(3 * SPOT)


def test_spend_so_far_unpriceable_is_none_with_one_warning(tmp_path, caplog):
    storage = _run(str(tmp_path / "run"), time.time() - 600, instance_type=None)
    with caplog.at_level(logging.WARNING, logger="spotrun"):
        assert spend_so_far(storage) is None
        assert spend_so_far(storage) is None
    lines = [r.getMessage() for r in caplog.records if "--max-cost" in r.getMessage()]
    assert len(lines) == 1 and "cannot price" in lines[0]
    # An empty run spent nothing.
    assert spend_so_far(Storage(str(tmp_path / "empty"))) == 0.0


def test_cost_guard_stops_when_the_spend_crosses_the_limit(tmp_path):
    now = time.time()
    storage = _run(str(tmp_path / "run"), now - 3600.0)
    limit = SPOT * 1.5  # crossed half an hour from now
    guard = CostGuard(Limits(max_cost_usd=limit), storage, min_interval_s=30.0)
    assert guard.check(now) is None and guard.pricings == 1
    assert guard.spent_usd == pytest.approx(SPOT)
    # Polled every few seconds: the ledger is read at most every 30 s.
    for dt in (1, 5, 10, 29):
        assert guard.check(now + dt) is None
    assert guard.pricings == 1
    assert guard.check(now + 31) is None and guard.pricings == 2
    assert guard.check(now + 1790) is None
    reason = guard.check(now + 1801)
    assert reason == f"spent ${guard.spent_usd:,.2f} of --max-cost {limit:,.2f}"
    assert guard.spent_usd >= limit
    # Sticky: once reached, the same reason, without pricing again.
    n = guard.pricings
    assert guard.check(now + 1900) == reason and guard.pricings == n


def test_cost_guard_prices_early_when_the_rate_says_the_limit_is_near(tmp_path):
    now = time.time()
    storage = _run(str(tmp_path / "run"), now - 3600.0)
    guard = CostGuard(Limits(max_cost_usd=SPOT * 1.5), storage, min_interval_s=3600.0)
    assert guard.check(now) is None
    assert guard.check(now + 1000) is None and guard.pricings == 1
    # Not an hour late: the next pricing was scheduled for the predicted crossing.
    assert guard.check(now + 1801) is not None and guard.pricings == 2


def test_cost_guard_without_a_limit_never_reads_the_ledger(tmp_path):
    storage = _run(str(tmp_path / "run"), time.time() - 3600.0)
    guard = CostGuard(Limits(max_wait_s=60.0), storage)
    assert guard.check() is None and guard.pricings == 0


def test_cost_guard_counts_both_nodes(tmp_path):
    now = time.time()
    storage = _run(str(tmp_path / "run"), now - 3600.0, nodes=2)
    # 1.5 node-hours: reached already by two nodes after one hour.
    reason = CostGuard(Limits(max_cost_usd=SPOT * 1.5), storage).check(now)
    assert reason is not None and reason.startswith(f"spent ${2 * SPOT:,.2f}")


def test_cost_guard_counts_machines_booting_from_their_launch(tmp_path):
    """A replacement or a grow's node boots for minutes before it joins (and reaches the
    ledger, billed from its launch): the guard counts it meanwhile, at its market's price."""
    now = time.time()
    storage = _run(str(tmp_path / "run"), now - 3600.0)
    on_demand = load_snapshot()["on_demand"]["g5.xlarge"]
    spot = Booting("g5.xlarge", "spot", "us-east-1", "us-east-1a", now - 1800.0)
    od = Booting("g5.xlarge", "on-demand", "us-east-1", None, now - 900.0)
    guard = CostGuard(Limits(max_cost_usd=SPOT * 1.5), storage, min_interval_s=30.0)
    # One node-hour booked plus half an hour of a booting spot machine: the limit is reached.
    assert guard.check(now, booting=[spot]) is not None
    assert guard.spent_usd == pytest.approx(SPOT * 1.5)
    guard = CostGuard(Limits(max_cost_usd=100.0), storage, min_interval_s=30.0)
    assert guard.check(now, booting=[spot, od]) is None
    assert guard.spent_usd == pytest.approx(SPOT * 1.5 + on_demand / 4)
    # Its rate counts toward the early re-pricing: 2 spot + 1 on-demand machines run now.
    assert guard.last.usd_per_hour == pytest.approx(2 * SPOT + on_demand)
    # One with no price counts nothing, with one warning; the rest still count.
    unknown = Booting("no-such.type", "spot", "us-east-1", None, now - 600.0)
    guard = CostGuard(Limits(max_cost_usd=100.0), storage, min_interval_s=30.0)
    guard.check(now, booting=[unknown, spot])
    assert guard.spent_usd == pytest.approx(SPOT * 1.5)


# -- waiting for capacity ---------------------------------------------------------------------


def test_wait_clock():
    clock = WaitClock(3600.0)
    assert clock.waited(50.0) == 0.0 and clock.expired(10_000.0) is None
    clock.no_capacity(100.0)
    clock.no_capacity(2000.0)  # still the same wait: the clock is not restarted
    assert clock.waited(160.0) == 60.0
    assert clock.expired(100.0 + 3599) is None
    assert clock.expired(100.0 + 3720) == "no capacity for 1h 02m (--max-wait 1h)"
    again = WaitClock.from_dict(3600.0, json.loads(json.dumps(clock.to_dict())))
    assert again.since == 100.0 and again.expired(100.0 + 3600) is not None
    clock.got_capacity()
    assert clock.waited(5000.0) == 0.0 and clock.expired(99_999.0) is None
    clock.no_capacity(5000.0)
    assert clock.waited(5030.0) == 30.0
    unlimited = WaitClock(None)
    unlimited.no_capacity(0.0)
    assert unlimited.expired(1e9) is None and unlimited.waited(10.0) == 10.0


def test_limits_status(tmp_path):
    now = time.time()
    storage = _run(str(tmp_path / "run"), now - 3600.0)
    options = {"limits": Limits(max_cost_usd=SPOT * 4, max_wait_s=6 * 3600.0).to_dict(),
               "waiting_since": now - 125.0}
    st = limits_status(options, storage, now=now)
    assert st["max_cost_usd"] == SPOT * 4 and st["max_wait_s"] == 21600.0
    assert st["spent_usd"] == pytest.approx(SPOT) and st["cost_fraction"] == pytest.approx(0.25)
    assert st["waiting_s"] == pytest.approx(125.0)
    assert st["text"] == [f"max cost   ${SPOT:,.2f} spent of ${SPOT * 4:,.2f} (25%)",
                          "max wait   6h; waiting for capacity 2m 05s"]
    json.dumps(st)
    # The caller's own figure is used as is; no limits: nothing to say.
    assert limits_status(options, storage, now=now, spent_usd=1.0)["spent_usd"] == 1.0
    assert limits_status({}, storage)["text"] == []
    assert limits_status({"limits": {"max_wait_s": 60}}, storage)["text"] == [
        "max wait   1m; not waiting for capacity"]
