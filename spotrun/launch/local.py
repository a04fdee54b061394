"""``spotrun launch --local``: play EC2 spot on this machine, with no AWS account.

The command runs as a child process, as it would on an instance, with:

* ``SPOTRUN_URL``: the run folder (default ``./runs/<name>``);
* ``SPOTRUN_SEGMENT_ID``: ``sim-<n>``, so the wrapper's ledger records join this segment;
* ``SPOTRUN_NOTICE_SOURCE=ec2`` and ``SPOTRUN_IMDS_ENDPOINT``: a
  :class:`~spotrun.notices.fake_server.FakeMetadataServer` on loopback, run by this process,
  serving instance type T on the spot market; ``SPOTRUN_POLL_INTERVAL`` (default 0.2 s).

Then it plays spot, ``--interruptions K`` times: it posts an interruption notice on the fake
metadata service, sends SIGTERM to the child's process group ``--grace`` seconds later if it
is still alive (AWS gives two minutes; the default is a few seconds), then SIGKILL after as
long again (the machine is gone), and starts the command again: a fresh "instance".

When the notices come: by default after the child has committed its first new checkpoint in
the segment, plus a random delay (``--seed``); so every segment makes progress and, as long
as the job checkpoints more than K times, all K interruptions land before it finishes. With
``--mean-interval S`` the notice comes at a random time around S seconds into each segment.

It stops when ``done.json`` appears (the child exits 0). Any other exit (not 75, not killed
by the simulator) is a failure: reported, exit code 1. Ctrl-C forwards one SIGINT to the
child, waits for it to commit its checkpoint and exit, and exits 130; run the same command
again to continue. Every segment is recorded in the run ledger (source ``"launcher"``), and
the cost report, priced offline as instance type T, is printed at the end.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError, LaunchError
from ..instance import InstanceInfo
from ..layout import EXIT_FINISHED, EXIT_INTERRUPTED
from ..storage import Storage
from .base import EventSink, LaunchEvent, LaunchEventKind, LaunchOutcome, log_events
from .book import RunBook
from .common import is_done, last_checkpoint
from .state import STOP_FILE, LaunchState, Segment, load_state, new_run_id

__all__ = ["LOCAL_BACKEND", "LocalBackend", "LocalLauncher", "LocalOptions", "default_run_url"]

REGION = "us-east-1"
ZONE = "us-east-1a"


@dataclass
class LocalOptions:
    """What ``spotrun launch --local`` was asked to do."""

    run_url: str
    command: list[str]
    interruptions: int = 2
    instance_type: str = "g5.xlarge"
    #: Notice to SIGTERM (AWS: 120 s), and SIGTERM to SIGKILL.
    grace_s: float = 5.0
    kill_after_s: float | None = None  # default: grace_s
    seed: int | None = None
    mean_interval: float | None = None
    #: How often this process checks on the child.
    poll_s: float = 0.1
    #: How often it looks at the run URL (checkpoints, stop requests); default 0.1 s on
    #: local disk, 1 s on object stores (each look is a LIST and a HEAD).
    check_s: float | None = None
    #: SPOTRUN_POLL_INTERVAL for the child's EC2 watcher.
    notice_poll_s: float = 0.2
    max_failures: int = 0
    env: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.command:
            raise ConfigError("no command to run; put it after --, e.g. spotrun launch --local -- python train.py")
        if self.interruptions < 0:
            raise ConfigError("--interruptions must be >= 0")
        if self.grace_s < 0:
            raise ConfigError("--grace must be >= 0 seconds")
        if self.mean_interval is not None and self.mean_interval <= 0:
            raise ConfigError("--mean-interval must be a positive number of seconds")


def default_run_url(command: list[str], name: str | None = None) -> str:
    """``./runs/<name>``; the name defaults to the script's stem and the current time."""
    if not name:
        script = next((a for a in command if a.endswith(".py")), command[0] if command else "run")
        stem = os.path.splitext(os.path.basename(script))[0] or "run"
        name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return os.path.join("runs", name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalLauncher:
    """Runs the command until the run is done, interrupting it like spot would.

    Args:
        storage: the run URL (any backend; local disk is the usual one).
        options: see :class:`LocalOptions`.
        on_event: receives every :class:`LaunchEvent` (default: the ``spotrun`` logger).
        clock, sleep: injectable for tests.
    """

    mode: ClassVar[str] = "local"

    def __init__(
        self,
        storage: Storage,
        options: LocalOptions,
        *,
        on_event: EventSink = log_events,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        options.validate()
        self.storage = storage
        self.options = options
        self.on_event = on_event
        self.clock = clock
        self.sleep = sleep
        self.rng = random.Random(options.seed)
        self._stop_signal: int | None = None
        self._stop_count = 0
        self._posted_last = False
        #: Segments whose whole process group this launcher saw end: their run lease may be
        #: taken over at once by the next segment (SPOTRUN_LEASE_TAKEOVER).
        self._gone_segments: list[str] = []
        #: Seconds between successive checkpoints, as observed (None until two are seen).
        self._ckpt_gap: float | None = None
        if options.check_s is None:
            options.check_s = 0.1 if storage.is_local else 1.0
        self.state = self._load_or_new_state()
        self.book = RunBook(storage, self.state, heartbeat_s=options.check_s)
        # The previous launcher died with a child running: close the books.
        self.book.close_open("stopped", "launcher died")

    def _load_or_new_state(self) -> LaunchState:
        state = load_state(self.storage)
        if state is None:
            return LaunchState(mode="local", run_id=new_run_id(), created_at=time.time(),
                               options=asdict(self.options))
        if state.mode != "local":
            raise ConfigError(
                f"{self.storage.display()} is an EC2 launch (run id {state.run_id}); "
                f"use spotrun launch --resume {self.storage.display()}"
            )
        if (state.status == "running" and state.controller_host == socket.gethostname()
                and state.controller_pid and state.controller_pid != os.getpid()
                and _pid_alive(state.controller_pid) and state.controller_alive()):
            raise ConfigError(
                f"another spotrun launch (pid {state.controller_pid}) is running {self.storage.display()}; "
                "stop it first (spotrun stop URL) or pick another --run-url"
            )
        state.status = "running"
        state.failures = 0
        state.options = asdict(self.options)
        return state

    # -- output and state --------------------------------------------------------------

    def _say(self, msg: str, kind: LaunchEventKind = LaunchEventKind.INFO,
             segment_id: str | None = None) -> None:
        self.on_event(LaunchEvent(kind, msg, segment_id))

    def _save(self) -> None:
        self.book.save()

    # -- signals -----------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum
        self._stop_count += 1

    def _install(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    # -- the run -----------------------------------------------------------------------

    def run(self) -> LaunchOutcome:
        """Run segments until done, failure or Ctrl-C; returns how it ended."""
        self.storage.ensure_root(create=True)
        if is_done(self.storage):
            self._say(f"{self.storage.display()} is already finished (done.json exists)", LaunchEventKind.OUTCOME)
            self.state.status = "finished"
            self._save()
            return LaunchOutcome("finished", 0, "already finished", len(self.state.segments),
                                 self.state.interruptions)
        self._save()
        previous = self._install()
        planned = self.options.interruptions
        done_interruptions = 0
        try:
            while True:
                interrupt = done_interruptions < planned
                reason, rc, detail = self._segment(interrupt=interrupt)
                if reason == "finished":
                    if done_interruptions < planned:
                        self._say(f"the run finished after {done_interruptions} of {planned} "
                                  "interruptions (it checkpoints too rarely to interrupt more; "
                                  "try --mean-interval)")
                    return self._end("finished", 0, "done.json written")
                if reason == "interrupted":
                    self.state.interruptions += 1
                    if self._posted_last:
                        done_interruptions += 1
                    self._save()
                    continue
                if reason == "stopped":
                    step = last_checkpoint(self.storage)
                    where = f"checkpoint at step {step}" if step is not None else "no checkpoint yet"
                    return self._end("stopped", 130,
                                     f"stopped ({detail}); {where} kept in {self.storage.display()}. "
                                     f"Continue with: spotrun launch --local --run-url "
                                     f"{self.storage.display()} -- {' '.join(self.options.command)}")
                self.state.failures += 1
                self._save()
                if self.state.failures > self.options.max_failures:
                    return self._end("failed", 1, detail)
                self._say(f"{detail}; restarting ({self.state.failures} of "
                          f"{self.options.max_failures} failure(s) allowed)")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _end(self, status: str, code: int, message: str) -> LaunchOutcome:
        self.state.status = status
        self.state.message = message
        self._save()
        self._say(f"run {status}: {message}", LaunchEventKind.OUTCOME)
        return LaunchOutcome(status, code, message, len(self.state.segments), self.state.interruptions)

    def _notice_delay(self) -> float:
        """Random wait before the notice, once armed (see the module docstring)."""
        if self.options.mean_interval is not None:
            return self.rng.uniform(0.5, 1.5) * self.options.mean_interval
        # Within half a checkpoint interval: the notice lands between two scheduled
        # checkpoints (so there is work to lose, as on real spot) but long before the job
        # could run out of steps.
        gap = self._ckpt_gap if self._ckpt_gap is not None else 0.5
        return self.rng.uniform(0.0, min(2.0, 0.5 * gap))

    def _segment(self, *, interrupt: bool) -> tuple[str, int | None, str]:
        from ..notices.fake_server import FakeMetadataServer

        o = self.options
        n = len(self.state.segments) + 1
        seg_id = f"sim-{n}"
        info = InstanceInfo(cloud="simulated", instance_id=seg_id, instance_type=o.instance_type,
                            region=REGION, availability_zone=ZONE, market="spot")
        server = FakeMetadataServer("ec2", instance=info).start()
        env = {**os.environ, **o.env,
               "SPOTRUN_URL": self.storage.url,
               "SPOTRUN_SEGMENT_ID": seg_id,
               "SPOTRUN_NOTICE_SOURCE": "ec2",
               "SPOTRUN_IMDS_ENDPOINT": server.url,
               "SPOTRUN_POLL_INTERVAL": str(o.notice_poll_s)}
        if self._gone_segments:
            env["SPOTRUN_LEASE_TAKEOVER"] = ",".join(self._gone_segments)
        start_step = last_checkpoint(self.storage)
        started = self.clock()
        seg = Segment(segment_id=seg_id, instance_id=seg_id, instance_type=o.instance_type,
                      market="spot", started_at=started, availability_zone=ZONE)
        self.book.begin(seg, info)
        self._say(f"segment {n} ({seg_id}, simulated {o.instance_type} spot): "
                  f"{' '.join(o.command)}" + (f" (resuming after step {start_step})" if start_step is not None else ""),
                  LaunchEventKind.SEGMENT_STARTED, seg_id)
        try:
            # Its own process group: a terminal's Ctrl-C reaches only us, and we forward one
            # SIGINT (a second would make the wrapper abort without its checkpoint).
            proc = subprocess.Popen(o.command, env=env, start_new_session=True)
        except OSError as exc:
            server.stop()
            self.book.end(seg, "failed", ended_at=self.clock(), detail=str(exc))
            raise LaunchError(f"cannot start {o.command[0]!r}: {exc}") from exc
        notice_at: float | None = None
        if interrupt and o.mean_interval is not None:
            notice_at = started + self._notice_delay()
        posted = term_at = kill_at = None
        forwarded = 0
        next_check = started
        seen_step, seen_at = start_step, None
        kill_after = o.grace_s if o.kill_after_s is None else o.kill_after_s
        try:
            while True:
                rc = proc.poll()
                if rc is not None:
                    break
                now = self.clock()
                if self._stop_count > forwarded:
                    sig = signal.SIGINT if self._stop_signal == signal.SIGINT else signal.SIGTERM
                    self._say(f"forwarding {sig.name} to the command; waiting for its checkpoint"
                              if forwarded == 0 else f"forwarding another {sig.name}")
                    _killpg(proc, sig)
                    forwarded = self._stop_count
                if now >= next_check:
                    next_check = now + o.check_s
                    if forwarded == 0 and self.storage.exists(STOP_FILE):
                        self.storage.remove(STOP_FILE)
                        self._stop_signal, self._stop_count = signal.SIGINT, 1
                        continue
                    step = last_checkpoint(self.storage) if notice_at is None or self._ckpt_gap is None else None
                    if step is not None and step != seen_step:
                        if seen_at is not None and seen_step != start_step:
                            self._ckpt_gap = now - seen_at
                        seen_step, seen_at = step, now
                    if (interrupt and notice_at is None and forwarded == 0 and step is not None
                            and (start_step is None or step > start_step)):
                        notice_at = now + self._notice_delay()
                if notice_at is not None and posted is None and forwarded == 0 and now >= notice_at:
                    server.post_interruption("terminate", in_seconds=o.grace_s)
                    posted = now
                    self._say(f"spot interruption notice for {seg_id}: SIGTERM in {o.grace_s:g}s", LaunchEventKind.NOTICE, seg_id)
                if posted is not None and term_at is None and now >= posted + o.grace_s:
                    self._say(f"{seg_id}: grace period over, SIGTERM", LaunchEventKind.NOTICE, seg_id)
                    _killpg(proc, signal.SIGTERM)
                    term_at = now
                if term_at is not None and kill_at is None and now >= term_at + kill_after:
                    self._say(f"{seg_id}: the machine is gone, SIGKILL", LaunchEventKind.NOTICE, seg_id)
                    _killpg(proc, signal.SIGKILL)
                    kill_at = now
                self.sleep(o.poll_s)
        except BaseException:
            # Never leave the child behind (it is in its own session, so nobody else would).
            if proc.poll() is None:
                _killpg(proc, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _killpg(proc, signal.SIGKILL)
                    proc.wait()
            raise
        finally:
            server.stop()
        if _group_gone(proc.pid):
            self._gone_segments.append(seg_id)
        self._posted_last = posted is not None
        reason, detail = self._classify(rc, posted=posted is not None, stopped=forwarded > 0)
        self.book.end(seg, reason, ended_at=self.clock(), exit_code=rc, detail=detail)
        self._say(f"{seg_id} ended: {reason} ({detail})", LaunchEventKind.SEGMENT_ENDED, seg_id)
        return reason, rc, detail

    def _classify(self, rc: int, *, posted: bool, stopped: bool) -> tuple[str, str]:
        if is_done(self.storage):
            if rc != EXIT_FINISHED:  # e.g. gloo's teardown aborting a worker after the run
                return "finished", (f"done.json written; warning: the command then exited "
                                    f"with code {rc}, ignored")
            return "finished", f"exit code {rc}, done.json written"
        if stopped:
            return "stopped", f"Ctrl-C, the command exited with code {rc}"
        if posted and (rc == EXIT_INTERRUPTED or rc < 0 or rc in (128 + 15, 128 + 9)):
            how = "committed and exited 75" if rc == EXIT_INTERRUPTED else f"killed (exit {rc})"
            return "interrupted", f"simulated spot interruption; the command {how}"
        if rc == EXIT_INTERRUPTED:
            return "interrupted", "the command stopped itself on a notice (exit 75)"
        if rc == EXIT_FINISHED:
            return "failed", ("the command exited 0 without writing done.json; does it run its "
                              "loop through spotrun.Checkpointer (range() or finish())?")
        return "failed", f"the command failed with exit code {rc}"


def _group_gone(pgid: int) -> bool:
    """True when no process of the child's session is left (one could still be writing)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class LocalBackend:
    """The local simulator's part in ``spotrun status`` and ``spotrun stop``."""

    mode = "local"

    def current_details(self, state: LaunchState, segment: Segment, *, live: bool) -> dict[str, Any]:
        return {}

    def stop(self, storage: Storage, state: LaunchState, *, wait_s: float | None,
             sleep: Callable[[float], None]) -> dict[str, Any]:
        """SIGINT to the launcher when it runs on this host (it forwards it to the command and
        waits for its checkpoint); else a stop request in the run URL, which it polls."""
        pid = state.controller_pid
        if state.status == "running" and pid and state.controller_host == socket.gethostname():
            try:
                os.kill(pid, signal.SIGINT)
                return {"signalled": pid}
            except ProcessLookupError:
                pass
        storage.write_bytes(STOP_FILE, json.dumps({"requested_at": time.time()}).encode())
        return {"signalled": None}


LOCAL_BACKEND = LocalBackend()
