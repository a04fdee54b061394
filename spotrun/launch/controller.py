"""The EC2 controller: keep one instance running the command until the run is done.

The loop, every ``poll_s``::

    stop requested (spotrun stop)?  -> stop
    done.json in the run URL?       -> let the instance shut itself down, finish
    no instance?                    -> choose spot or on-demand, launch (pool by pool)
    instance gone?                  -> why: spot interruption / exit record / user -> relaunch
                                       or stop on failure limits

Every decision is written to ``RUN_URL/launch/state.json`` *before* the next one is taken,
and every instance carries the run id tag, so a controller that dies can be replaced by
``spotrun launch --resume RUN_URL`` without ever running two instances of one run.

Fallback to on-demand (``--fallback on-demand``), when any rule says so:

* the run had ``--max-interruptions`` spot interruptions already;
* every pool answers ``SpotMaxPriceTooLow`` (spot is above ``--max-price``);
* ``--deadline`` is less than ``deadline_margin_s`` away;
* no spot pool had capacity for ``spot_wait_s``.

All time constants live in :class:`Timing` so tests run the whole loop in seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import CapacityError, ConfigError, LaunchError
from ..events import Cloud
from ..instance import InstanceInfo
from ..layout import EXIT_FINISHED, EXIT_INTERRUPTED
from ..storage import Storage
from .base import EventSink, LaunchEvent, LaunchEventKind, LaunchOutcome, log_events
from .book import RunBook, close_books
from .common import is_done
from .ec2 import PRICE_ERRORS, SPOT_INTERRUPTION, Ec2Api, InstanceStatus, Pool
from .state import (
    STOP_FILE,
    LaunchState,
    Segment,
    exit_record_path,
    load_state,
    new_run_id,
)
from .userdata import build_user_data

__all__ = ["EC2_BACKEND", "Ec2Backend", "Ec2Controller", "Ec2Options", "LaunchOutcome", "Timing"]

log = logging.getLogger("spotrun")


@dataclass
class Timing:
    """Every wait of the controller, in seconds (tests shrink them all)."""

    poll_s: float = 15.0
    #: Between rounds of create_fleet when no pool has capacity.
    capacity_retry_s: float = 30.0
    #: How long to keep asking for spot before ``--fallback on-demand`` takes over.
    spot_wait_s: float = 600.0
    #: Give up (CapacityError) after asking this long for any capacity at all.
    capacity_timeout_s: float = 3600.0
    #: After done.json appears: how long the instance may take to shut itself down.
    finish_grace_s: float = 300.0
    #: A new instance id may be invisible to DescribeInstances for a little while.
    missing_grace_s: float = 120.0
    #: Fall back to on-demand once the deadline is this close.
    deadline_margin_s: float = 3600.0


@dataclass
class Ec2Options:
    """What ``spotrun launch`` (EC2 mode) was asked to do; persisted for ``--resume``."""

    run_url: str
    command: list[str]
    instance_types: list[str]
    region: str | None = None
    subnets: list[str] = field(default_factory=list)
    ami: str | None = None
    setup: list[str] = field(default_factory=list)
    iam_instance_profile: str | None = None
    security_group_ids: list[str] = field(default_factory=list)
    key_name: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # NAME -> ssm:/path or secret ARN
    max_interruptions: int | None = None
    max_failures: int = 0
    fallback: str = "on-demand"  # "on-demand" | "none"
    max_price: float | None = None
    deadline: float | None = None  # epoch seconds

    def validate(self) -> None:
        if not self.command:
            raise ConfigError("no command to run; put it after --, e.g. spotrun launch ... -- python train.py")
        if not self.instance_types:
            raise ConfigError("no instance types; pass --instance-types g5.xlarge,g6.xlarge")
        if self.fallback not in ("on-demand", "none"):
            raise ConfigError(f"--fallback {self.fallback!r} is not on-demand or none")
        if self.max_interruptions is not None and self.max_interruptions < 0:
            raise ConfigError("--max-interruptions must be >= 0")
        if self.max_failures < 0:
            raise ConfigError("--max-failures must be >= 0")
        if self.max_price is not None and self.max_price <= 0:
            raise ConfigError("--max-price must be a positive USD-per-hour price")

    @property
    def pools(self) -> list[Pool]:
        subnets: list[str | None] = list(self.subnets) or [None]
        return [Pool(t, s) for t in self.instance_types for s in subnets]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ec2Options:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class Ec2Controller:
    """Keeps the run going on EC2; see the module docstring.

    Args:
        storage: the run URL.
        api: the EC2 calls (one region).
        state: the run's launch state (new or loaded for ``--resume``).
        timing: the waits.
        on_ctrl_c: what Ctrl-C does to instances still running: ``"terminate"``,
            ``"leave"``, or a function given their description that returns one of those
            (the CLI asks the user through it).
        on_event: receives every :class:`LaunchEvent` (default: the ``spotrun`` logger).
    """

    mode: ClassVar[str] = "ec2"

    def __init__(
        self,
        storage: Storage,
        api: Ec2Api,
        state: LaunchState,
        *,
        timing: Timing | None = None,
        on_ctrl_c: str | Callable[[str], str] = "terminate",
        on_event: EventSink = log_events,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.storage = storage
        self.api = api
        self.state = state
        self.options = Ec2Options.from_dict(state.options)
        self.timing = timing or Timing()
        self.on_ctrl_c = on_ctrl_c
        self.on_event = on_event
        self.clock = clock
        self.sleep = sleep
        self.book = RunBook(storage, state, heartbeat_s=self.timing.poll_s)
        # segment id -> the last time a poll saw its instance alive (proof of life).
        self._seen_alive: dict[str, float] = {}

    # -- construction ------------------------------------------------------------------

    @classmethod
    def start(cls, storage: Storage, api: Ec2Api, options: Ec2Options, *, run_id: str | None = None,
              **kwargs: Any) -> Ec2Controller:
        """A controller for a new run at ``storage`` (refuses a URL another launch owns).

        ``run_id`` (default: random) is the ``spotrun:run-id`` tag value; naming it lets an
        IAM policy scope TerminateInstances to this run's instances (docs/launch.md, IAM).
        """
        options.validate()
        existing = load_state(storage)
        if existing is not None and existing.status == "running":
            raise ConfigError(
                f"{storage.display()} already has a launch (run id {existing.run_id}, "
                f"status running); pick it up with: spotrun launch --resume {storage.display()}"
            )
        # The script is built now so that bad options fail before anything is created.
        build_user_data(run_url=options.run_url, run_id="check", command=options.command,
                        setup=options.setup, env=options.env, secrets=options.secrets)
        state = LaunchState(
            mode="ec2", run_id=run_id or new_run_id(), created_at=time.time(), options=options.to_dict()
        )
        if existing is not None:
            # A finished/stopped/failed run launched again: keep its counters and history.
            state.segments = existing.segments
            state.interruptions = existing.interruptions
        return cls(storage, api, state, **kwargs)

    @classmethod
    def resume(cls, storage: Storage, api: Ec2Api | None = None, **kwargs: Any) -> Ec2Controller:
        """A controller that continues the launch recorded at ``storage``."""
        state = load_state(storage)
        if state is None:
            raise ConfigError(
                f"no launch state at {storage.display('launch/state.json')}; start the run with "
                "spotrun launch --run-url ... -- CMD"
            )
        if state.mode != "ec2":
            raise ConfigError(f"{storage.display()} was launched in {state.mode} mode, not EC2")
        if api is None:
            api = Ec2Api.for_region(state.options.get("region"))
        if state.status in ("stopped", "failed"):
            # Resuming a run that was stopped means: carry on.
            state.status = "running"
            state.failures = 0
        return cls(storage, api, state, **kwargs)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> LaunchOutcome:
        """Run until the run is done, fails or is stopped. Ctrl-C: see ``on_ctrl_c``."""
        try:
            if self.state.status == "finished" or is_done(self.storage):
                return self._finish()
            self._ensure_template()
            self._reconcile()
            while True:
                self._save()
                if self.storage.exists(STOP_FILE):
                    return self._stopped_by_request()
                if is_done(self.storage):
                    return self._finish()
                cur = self.state.current
                if cur is None:
                    outcome = self._launch()
                    if outcome is not None:
                        return outcome
                    continue
                status = self.api.describe(cur.instance_id)
                if status.alive or (
                    status.state == "missing"
                    and self.clock() - cur.started_at < self.timing.missing_grace_s
                ):
                    if status.alive:
                        self._seen_alive[cur.segment_id] = self.clock()
                    self.sleep(self.timing.poll_s)
                    continue
                outcome = self._segment_over(cur, status)
                if outcome is not None:
                    return outcome
        except KeyboardInterrupt:
            return self._ctrl_c()
        except Exception as exc:
            self._left_running(exc)
            raise

    def _left_running(self, exc: BaseException) -> None:
        """The controller is dying of an error: say what may still run and how to stop it."""
        cur = self.state.current
        url = self.storage.display()
        with contextlib.suppress(Exception):
            self.state.message = f"controller stopped: {exc}"
            self._save()
        if cur is not None:
            self._say(f"controller error ({exc}); instance {cur.instance_id} ({cur.instance_type}, "
                      f"{cur.market}) in {self.api.region} may still be running. Watch it again: "
                      f"spotrun launch --resume {url}; stop it: spotrun stop {url}", LaunchEventKind.WARNING)

    # -- steps -------------------------------------------------------------------------

    def _save(self) -> None:
        self.book.save()

    def _say(self, msg: str, kind: LaunchEventKind = LaunchEventKind.INFO,
             segment_id: str | None = None) -> None:
        self.on_event(LaunchEvent(kind, msg, segment_id))

    def _ensure_template(self) -> None:
        if self.state.launch_template_id:
            return
        o = self.options
        user_data = build_user_data(
            run_url=o.run_url, run_id=self.state.run_id, command=o.command, setup=o.setup, env=o.env,
            secrets=o.secrets,
        )
        ami = self.api.resolve_ami(o.ami)
        self.state.launch_template_id = self.api.create_launch_template(
            run_id=self.state.run_id,
            ami=ami,
            user_data=user_data,
            iam_instance_profile=o.iam_instance_profile,
            security_group_ids=o.security_group_ids,
            key_name=o.key_name,
        )
        self._save()

    def _reconcile(self) -> None:
        """Make the state agree with what EC2 runs under this run id (after a crash).

        One instance running, unknown to the state: the controller died between launching it
        and writing the state; adopt it. More than one: keep the one the state knows (or the
        newest), terminate the rest, since two processes training one run would overwrite
        each other's checkpoints.
        """
        alive = [s for s in self.api.find_run_instances(self.state.run_id) if s.state in ("pending", "running")]
        cur = self.state.current
        keep: InstanceStatus | None = None
        if cur is not None:
            keep = next((s for s in alive if s.instance_id == cur.instance_id), None)
        if keep is None and cur is None and alive:
            keep = alive[-1]
            self._say(f"adopting {keep.instance_id} ({keep.instance_type}, {keep.market}): "
                      "it was launched for this run before the controller stopped")
            self._begin_segment(keep.instance_id, Pool(keep.instance_type or "?", keep.subnet_id),
                                keep.market or "spot", fleet_id=None, started_at=keep.launch_time)
        # Anything else alive under this run id is a stray (if the state's own instance is
        # gone, the loop records its end; it must not be joined by a second one).
        extras = [s.instance_id for s in alive if keep is None or s.instance_id != keep.instance_id]
        if extras:
            self._say(f"terminating {', '.join(extras)}: more than one instance for this run")
            self.api.terminate(extras)

    def _begin_segment(self, instance_id: str, pool: Pool, market: str, *, fleet_id: str | None,
                       started_at: float | None = None) -> Segment:
        now = started_at or self.clock()
        seg = Segment(
            segment_id=instance_id, instance_id=instance_id, instance_type=pool.instance_type,
            market=market, started_at=now, subnet_id=pool.subnet_id, fleet_id=fleet_id,
        )
        try:
            status = self.api.describe(instance_id)
            seg.availability_zone = status.availability_zone
        except LaunchError:
            pass
        self.book.begin(seg, InstanceInfo(
            cloud=Cloud.AWS.value, instance_id=instance_id, instance_type=pool.instance_type,
            region=self.api.region, availability_zone=seg.availability_zone, market=market,
        ))
        self._say(f"running on {instance_id} ({pool}, {market}, {seg.availability_zone or '?'}); "
                  f"segment {len(self.state.segments)}", LaunchEventKind.SEGMENT_STARTED, seg.segment_id)
        return seg

    def _end_segment(self, seg: Segment, reason: str, *, exit_code: int | None = None,
                     detail: str | None = None, ended_at: float | None = None) -> None:
        self.book.end(seg, reason, ended_at=self.clock() if ended_at is None else ended_at,
                      exit_code=exit_code, detail=detail)

    def _gone_at(self, seg: Segment, status: InstanceStatus) -> float:
        """When the segment's instance went, at the earliest the evidence supports.

        Noticing is not going: a controller that was down (or slow) for hours would bill
        hours that never ran. The end is EC2's state-transition time when it gives one, else
        the interruption notice's deadline (a reclaimed spot instance is gone by then), else
        the last proof of life; never before the last proof of life (the wrapper's last
        ledger record, the last poll that saw the instance alive) and never after now.
        """
        now = self.clock()
        alive_until = max(seg.started_at, self._seen_alive.get(seg.segment_id, seg.started_at))
        deadlines: list[float] = []
        try:
            from ..ledger import Ledger

            for r in Ledger(self.storage).records():
                if r.get("segment_id") != seg.segment_id or r.get("source") == "launcher":
                    continue
                t = r.get("time")
                if isinstance(t, float) and math.isfinite(t) and t <= now:
                    alive_until = max(alive_until, t)
                d = r.get("deadline") if r.get("event") == "notice_received" else None
                if isinstance(d, (int, float)) and math.isfinite(d):
                    deadlines.append(float(d))
        except Exception as exc:  # noqa: BLE001 - the bill's precision never stops the run
            log.warning("could not read the run ledger to time the end of %s: %s", seg.segment_id, exc)
        if status.transition_at is not None:
            gone = status.transition_at
        elif deadlines:
            gone = min(deadlines)
        else:
            gone = alive_until
        return min(now, max(alive_until, gone))

    def _deadline_at_risk(self) -> bool:
        d = self.options.deadline
        return d is not None and d - self.clock() < self.timing.deadline_margin_s

    def _choose_market(self) -> tuple[str | None, str]:
        """("spot" | "on-demand", why), or (None, why) when the rules say stop."""
        o = self.options
        if o.max_interruptions is not None and self.state.interruptions >= o.max_interruptions:
            if o.fallback == "on-demand":
                return "on-demand", f"{self.state.interruptions} spot interruptions (--max-interruptions {o.max_interruptions})"
            return None, (f"stopping after {self.state.interruptions} spot interruptions "
                          f"(--max-interruptions {o.max_interruptions}, --fallback none)")
        if self._deadline_at_risk():
            if o.fallback == "on-demand":
                return "on-demand", "the deadline is near"
            log.warning("the deadline is near but --fallback none: staying on spot")
        return "spot", "default"

    def _avoid_pool(self) -> Pool | None:
        """The pool of the last interrupted spot segment: try the others first."""
        for seg in reversed(self.state.segments):
            if seg.end_reason == "interrupted" and seg.market == "spot" and seg.instance_type:
                return Pool(seg.instance_type, seg.subnet_id)
            if seg.end_reason is not None:
                return None
        return None

    def _launch(self) -> LaunchOutcome | None:
        market, why = self._choose_market()
        if market is None:
            return self._give_up("failed", why, exit_code=1)
        if market == "on-demand" and why != "default":
            self._say(f"using on-demand: {why}", LaunchEventKind.CAPACITY)
        all_pools = self.options.pools
        avoid = self._avoid_pool() if market == "spot" else None
        round_pools = [p for p in all_pools if p != avoid] or all_pools
        started = self.clock()
        failed: set[Pool] = set()
        price_blocked: set[Pool] = set()
        last_errors: list[str] = []
        assert self.state.launch_template_id
        while True:
            if self.storage.exists(STOP_FILE):
                return self._stopped_by_request()
            self.state.attempts += 1
            self._save()
            result = self.api.create_fleet(
                run_id=self.state.run_id,
                template_id=self.state.launch_template_id,
                pools=round_pools,
                market=market,
                max_price=self.options.max_price if market == "spot" else None,
                client_token=f"spotrun-{self.state.run_id}-{self.state.attempts}",
            )
            if result.instances:
                got, extra = result.instances[0], result.instances[1:]
                if extra:
                    self.api.terminate([i.instance_id for i in extra])
                self._begin_segment(got.instance_id, got.pool, got.market, fleet_id=result.fleet_id)
                return None
            hard = [e for e in result.errors if not e.is_capacity]
            if hard and not any(e.is_capacity for e in result.errors):
                e = hard[0]
                raise LaunchError(f"create_fleet ({market}) failed in {e.pool or 'every pool'}: "
                                  f"{e.code}: {e.message}")
            if not result.errors:
                failed.update(round_pools)
                last_errors = [f"{market}: no instance and no error for {', '.join(map(str, round_pools))}"]
            for e in result.errors:
                pools = [e.pool] if e.pool else round_pools
                failed.update(pools)
                if e.code in PRICE_ERRORS:
                    price_blocked.update(pools)
                msg = f"{market} {e.pool or 'all pools'}: {e.code}"
                last_errors.append(msg)
                self._say(f"no capacity: {msg}", LaunchEventKind.CAPACITY)
            remaining = [p for p in all_pools if p not in failed]
            if remaining:
                round_pools = remaining  # the next pool(s), in the same round
                continue
            waited = self.clock() - started
            if market == "spot" and self.options.fallback == "on-demand":
                reason = None
                if price_blocked >= set(all_pools):
                    reason = f"spot is above --max-price {self.options.max_price} in every pool"
                elif waited >= self.timing.spot_wait_s:
                    reason = f"no spot capacity for {waited:.0f}s"
                elif self._deadline_at_risk():
                    reason = "the deadline is near"
                if reason is not None:
                    self._say(f"falling back to on-demand: {reason}", LaunchEventKind.CAPACITY)
                    market = "on-demand"
                    failed.clear()
                    price_blocked.clear()
                    round_pools = all_pools
                    continue
            if waited >= self.timing.capacity_timeout_s:
                raise CapacityError(
                    f"no {market} capacity in {', '.join(map(str, all_pools))} for {waited:.0f}s "
                    f"({'; '.join(last_errors[-len(all_pools):])}); add instance types or subnets, "
                    "or allow --fallback on-demand"
                )
            self.sleep(self.timing.capacity_retry_s)
            failed.clear()
            price_blocked.clear()
            round_pools = all_pools

    def _read_exit_record(self, seg: Segment) -> int | None:
        rel = exit_record_path(seg.segment_id)
        if not self.storage.exists(rel):
            return None
        try:
            return int(json.loads(self.storage.read_bytes(rel))["exit_code"])
        except (ValueError, KeyError, TypeError):
            return None

    def classify(self, seg: Segment, status: InstanceStatus) -> tuple[str, int | None, str]:
        """Why the segment's instance is gone: (reason, exit code, detail)."""
        code = self._read_exit_record(seg)
        rc = status.reason_code
        if is_done(self.storage):
            return "finished", code, _finished_detail(code)
        if rc == SPOT_INTERRUPTION:
            return "interrupted", code, "spot interruption"
        if code == EXIT_INTERRUPTED:
            return "interrupted", code, "the command stopped on an interruption notice (exit 75)"
        if code is not None:
            what = "exited 0 without writing done.json" if code == 0 else f"exited with code {code}"
            return "failed", code, f"the command {what}; see /var/log/spotrun.log on the instance"
        if rc.startswith("Server."):
            return "interrupted", None, f"EC2 ended the instance ({rc})"
        if rc == "Client.UserInitiatedShutdown":
            return "stopped", None, "the instance was terminated from outside spotrun"
        if rc == "Client.InstanceInitiatedShutdown":
            return "failed", None, ("the instance shut down without an exit record (setup failed "
                                    "before spotrun was installed?); see its console output")
        if status.state in ("stopped", "stopping"):
            return "interrupted", None, f"the instance is {status.state}"
        if status.state == "missing":
            return "interrupted", None, "the instance disappeared"
        return "failed", None, f"instance {status.state} ({rc or 'no reason given'})"

    def _segment_over(self, seg: Segment, status: InstanceStatus) -> LaunchOutcome | None:
        reason, code, detail = self.classify(seg, status)
        ended_at = self._gone_at(seg, status)
        if status.state in ("stopped", "stopping"):
            self.api.terminate([seg.instance_id])
        self._end_segment(seg, reason, exit_code=code, detail=detail, ended_at=ended_at)
        self._say(f"{seg.instance_id} ended: {reason} ({detail})", LaunchEventKind.SEGMENT_ENDED, seg.segment_id)
        if reason == "finished":
            return self._finish()
        if reason == "interrupted":
            self.state.interruptions += 1
            self._save()
            return None
        if reason == "stopped":
            return self._give_up("stopped", f"{detail}; resume with: spotrun launch --resume "
                                 f"{self.storage.display()}", exit_code=1)
        self.state.failures += 1
        self._save()
        if self.state.failures > self.options.max_failures:
            return self._give_up("failed", f"{detail} ({self.state.failures} failure(s), "
                                 f"--max-failures {self.options.max_failures})", exit_code=1)
        return None

    def _wait_gone(self, instance_id: str, timeout: float) -> InstanceStatus:
        end = self.clock() + timeout
        status = self.api.describe(instance_id)
        while status.alive and self.clock() < end:
            self.sleep(min(self.timing.poll_s, max(0.0, end - self.clock())))
            status = self.api.describe(instance_id)
        return status

    def _finish(self) -> LaunchOutcome:
        cur = self.state.current
        if cur is not None:
            status = self._wait_gone(cur.instance_id, self.timing.finish_grace_s)
            ended_at = None
            if status.alive:
                self._say(f"terminating {cur.instance_id}: the run is done but it did not shut down")
                self.api.terminate([cur.instance_id])
            else:
                ended_at = self._gone_at(cur, status)
            code = self._read_exit_record(cur)
            self._end_segment(cur, "finished", exit_code=code, detail=_finished_detail(code),
                              ended_at=ended_at)
        self._cleanup_template()
        self.state.status = "finished"
        self.state.message = "done.json written"
        self._save()
        self._say(f"run finished after {len(self.state.segments)} segment(s), "
                  f"{self.state.interruptions} interruption(s)", LaunchEventKind.OUTCOME)
        return LaunchOutcome("finished", 0, "finished", len(self.state.segments), self.state.interruptions)

    def _cleanup_template(self) -> None:
        if self.state.launch_template_id:
            self.api.delete_launch_template(self.state.launch_template_id)
            self.state.launch_template_id = None

    def _give_up(self, status: str, why: str, *, exit_code: int) -> LaunchOutcome:
        cur = self.state.current
        if cur is not None:
            self.api.terminate([cur.instance_id])
            self._end_segment(cur, "stopped" if status == "stopped" else "failed", detail=why)
        self._cleanup_template()
        self.state.status = status
        self.state.message = why
        self._save()
        self._say(f"run {status}: {why}", LaunchEventKind.OUTCOME)
        return LaunchOutcome(status, exit_code, why, len(self.state.segments), self.state.interruptions)

    def _stopped_by_request(self) -> LaunchOutcome:
        self.storage.remove(STOP_FILE)
        alive = [s.instance_id for s in self.api.find_run_instances(self.state.run_id)
                 if s.state not in ("terminated", "shutting-down")]
        if alive:
            self.api.terminate(alive)
        return self._give_up("stopped", "stopped by spotrun stop; checkpoints kept", exit_code=0)

    # -- Ctrl-C ------------------------------------------------------------------------

    def _ctrl_c(self) -> LaunchOutcome:
        """Never leave an instance running without saying so (see ``on_ctrl_c``)."""
        url = self.storage.display()
        try:
            alive = [s for s in self.api.find_run_instances(self.state.run_id)
                     if s.state in ("pending", "running")]
        except Exception as exc:  # noqa: BLE001 - we must still say something useful
            cur = self.state.current
            self._say(f"interrupted; could not list the run's instances ({exc}). "
                      f"{'Instance ' + cur.instance_id + ' may still be running. ' if cur else ''}"
                      f"Stop everything with: spotrun stop {url}")
            return LaunchOutcome("detached", 130, "interrupted", len(self.state.segments), self.state.interruptions)
        if not alive:
            self._say(f"interrupted; no instance is running for this run. Resume with: spotrun launch --resume {url}")
            self._save()
            return LaunchOutcome("detached", 130, "interrupted", len(self.state.segments), self.state.interruptions)
        desc = ", ".join(f"{s.instance_id} ({s.instance_type} {s.market} in {s.availability_zone})" for s in alive)
        choice = self.on_ctrl_c(desc) if callable(self.on_ctrl_c) else self.on_ctrl_c
        if choice not in ("terminate", "leave"):
            choice = "terminate"  # never leave compute running unless told to
        if choice == "terminate":
            ids = [s.instance_id for s in alive]
            self.api.terminate(ids)
            cur = self.state.current
            if cur is not None:
                self._end_segment(cur, "stopped", detail="Ctrl-C on the controller")
            self.state.status = "stopped"
            self.state.message = "Ctrl-C on the controller"
            self._save()
            self._say(f"terminated {', '.join(ids)} (its shutdown sends SIGTERM, so the command "
                      f"commits a checkpoint). Checkpoints are kept at {url}. "
                      f"Resume with: spotrun launch --resume {url}")
            return LaunchOutcome("stopped", 130, "Ctrl-C", len(self.state.segments), self.state.interruptions)
        self._save()
        region = self.api.region
        self._say(f"left running: {desc} in {region}; it keeps training into {url} but nothing "
                  f"relaunches it now. Watch it again: spotrun launch --resume {url}; stop it: "
                  f"spotrun stop {url} (or aws ec2 terminate-instances --region {region} "
                  f"--instance-ids {' '.join(s.instance_id for s in alive)})")
        return LaunchOutcome("detached", 130, "Ctrl-C, instance left running", len(self.state.segments),
                             self.state.interruptions)


def _finished_detail(code: int | None) -> str:
    """done.json decides that the run finished; an exit code after it (gloo's teardown can
    abort a worker once the run is done) is only worth a warning."""
    if code in (None, EXIT_FINISHED):
        return "done.json written"
    log.warning("done.json written, so the run finished, although the command exited with "
                "code %d", code)
    return f"done.json written; warning: the command then exited with code {code}, ignored"


class Ec2Backend:
    """EC2's part in ``spotrun status`` and ``spotrun stop`` (see :class:`~.base.Backend`)."""

    mode = "ec2"

    def current_details(self, state: LaunchState, segment: Segment, *, live: bool) -> dict[str, Any]:
        if not live:
            return {}
        try:
            return {"state": Ec2Api.for_region(state.options.get("region")).describe(segment.instance_id).state}
        except Exception as exc:  # noqa: BLE001 - status must work without AWS access
            return {"state_error": str(exc)}

    def stop(self, storage: Storage, state: LaunchState, *, wait_s: float | None,
             sleep: Callable[[float], None]) -> dict[str, Any]:
        """Ask a live controller to stop (``launch/stop.json``) and terminate every instance
        tagged with the run id here, so it works with or without a controller."""
        result: dict[str, Any] = {"terminated": []}
        api = Ec2Api.for_region(state.options.get("region"))
        alive_controller = state.controller_alive()
        if alive_controller and state.controller_host == socket.gethostname() and state.controller_pid:
            try:
                os.kill(state.controller_pid, 0)
            except ProcessLookupError:
                alive_controller = False
            except PermissionError:
                pass
        storage.write_bytes(STOP_FILE, json.dumps({"requested_at": time.time()}).encode())
        ids = [s.instance_id for s in api.find_run_instances(state.run_id)
               if s.state not in ("terminated", "shutting-down")]
        api.terminate(ids)
        result["terminated"] = ids
        if alive_controller:
            # The controller writes the ledger and the state; give it a few polls to notice.
            deadline = time.time() + (wait_s if wait_s is not None else max(30.0, 3 * (state.poll_s or 0)))
            while time.time() < deadline:
                fresh = load_state(storage)
                if fresh is not None and fresh.status != "running":
                    result["controller"] = "acknowledged"
                    return result
                sleep(0.5)
            result["controller"] = "no answer"
        close_books(storage, state)
        return result


EC2_BACKEND = Ec2Backend()
