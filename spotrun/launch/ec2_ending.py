"""How the EC2 controller ends a run: finished, given up (failed or stopped), stopped by
``spotrun stop`` or ``--max-cost``, Ctrl-C, or the controller's own error.

Every way out ends the open segments in the books, deletes the run's per-region resources
(launch templates, placement groups), writes the final status to the launch state and
returns the :class:`~.base.LaunchOutcome`; none leaves an instance running without saying
so and how to stop it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from ..events import EndReason
from .attempt import Verdict, finished_detail
from .base import LaunchEventKind, LaunchOutcome
from .ec2 import InstanceStatus
from .state import STOP_FILE, RunStatus, Segment

if TYPE_CHECKING:
    from .controller import Ec2Controller

__all__ = ["Ec2Ending"]


class Ec2Ending:
    """The ways out of ``ctl``'s run (see the module docstring)."""

    def __init__(self, ctl: Ec2Controller) -> None:
        self.ctl = ctl

    def finish(self) -> LaunchOutcome:
        attempt = self.ctl.state.running
        if attempt:
            statuses = self.wait_gone(attempt, self.ctl.timing.finish_grace_s)
            alive = [s for s in attempt if statuses[s.instance_id].alive]
            if alive:
                self.ctl._say(f"terminating {', '.join(s.instance_id for s in alive)}: the run is done but "
                          f"{'it' if len(alive) == 1 else 'they'} did not shut down")
                self.ctl._terminate(alive)
            for seg in attempt:
                ended_at = None if seg in alive else self.ctl._gone_at(seg, statuses[seg.instance_id])
                code = self.ctl._read_exit_record(seg)
                detail = self.ctl._warn_finished(Verdict(EndReason.FINISHED, finished_detail(code)), code)
                self.ctl._end_segment(seg, EndReason.FINISHED, exit_code=code, detail=detail, ended_at=ended_at)
        self.ctl.capacity.cleanup()
        self.ctl.state.status = RunStatus.FINISHED
        self.ctl.state.message = "done.json written"
        self.ctl._save()
        self.ctl._say(f"run finished after {len(self.ctl.state.segments)} segment(s), "
                  f"{self.ctl.state.interruptions} interruption(s)", LaunchEventKind.OUTCOME)
        return LaunchOutcome(RunStatus.FINISHED, 0, "finished", len(self.ctl.state.segments), self.ctl.state.interruptions)

    def give_up(self, status: str, why: str, *, exit_code: int) -> LaunchOutcome:
        attempt = self.ctl.state.running
        if attempt:
            self.ctl._terminate(attempt)
            for seg in attempt:
                self.ctl._end_segment(seg, EndReason.STOPPED if status == RunStatus.STOPPED else EndReason.FAILED, detail=why)
        self.ctl.capacity.cleanup()
        self.ctl.state.status = status
        self.ctl.state.message = why
        self.ctl._save()
        self.ctl._say(f"run {status}: {why}", LaunchEventKind.OUTCOME)
        return LaunchOutcome(status, exit_code, why, len(self.ctl.state.segments), self.ctl.state.interruptions)

    def terminate_all(self) -> list[str]:
        """Terminate every instance of the run, in every region used (what ``stop`` does)."""
        found: dict[str, list[str]] = {}
        for region, s in self.ctl._alive_everywhere(("pending", "running", "stopping", "stopped")):
            found.setdefault(region, []).append(s.instance_id)
        for region, ids in found.items():
            self.ctl._api(region).terminate(ids)
        return [i for ids in found.values() for i in ids]

    def stopped_by_request(self) -> LaunchOutcome:
        self.ctl.storage.remove(STOP_FILE)
        self.terminate_all()
        return self.give_up(RunStatus.STOPPED, "stopped by spotrun stop; checkpoints kept", exit_code=0)

    def budget_stop(self, why: str) -> LaunchOutcome:
        """Stop as ``spotrun stop`` does (the shutdown SIGTERMs the command, which commits)."""
        url = self.ctl.storage.display()
        self.terminate_all()
        return self.give_up(RunStatus.STOPPED, f"{why}; checkpoints kept. To continue, raise the limit: "
                             f"spotrun launch --resume {url} --max-cost USD", exit_code=1)

    def ctrl_c(self) -> LaunchOutcome:
        """Never leave an instance running without saying so (see ``on_ctrl_c``)."""
        url = self.ctl.storage.display()
        try:
            alive = self.ctl._alive_everywhere()
        except Exception as exc:  # noqa: BLE001 - we must still say something useful
            running = self.ctl.state.running
            ids = ", ".join(s.instance_id for s in running)
            self.ctl._say(f"interrupted; could not list the run's instances ({exc}). "
                      f"{'Instance ' + ids + ' may still be running. ' if running else ''}"
                      f"Stop everything with: spotrun stop {url}")
            return LaunchOutcome(RunStatus.DETACHED, 130, "interrupted", len(self.ctl.state.segments), self.ctl.state.interruptions)
        if not alive:
            self.ctl._say(f"interrupted; no instance is running for this run. Resume with: spotrun launch --resume {url}")
            self.ctl._save()
            return LaunchOutcome(RunStatus.DETACHED, 130, "interrupted", len(self.ctl.state.segments), self.ctl.state.interruptions)
        desc = ", ".join(f"{s.instance_id} ({s.instance_type} {s.market} in {s.availability_zone})" for _, s in alive)
        choice = self.ctl.on_ctrl_c(desc) if callable(self.ctl.on_ctrl_c) else self.ctl.on_ctrl_c
        if choice not in ("terminate", "leave"):
            choice = "terminate"  # never leave compute running unless told to
        by_region: dict[str, list[str]] = {}
        for region, s in alive:
            by_region.setdefault(region, []).append(s.instance_id)
        if choice == "terminate":
            for region, ids in by_region.items():
                self.ctl._api(region).terminate(ids)
            for seg in self.ctl.state.running:
                self.ctl._end_segment(seg, EndReason.STOPPED, detail="Ctrl-C on the controller")
            self.ctl.state.status = RunStatus.STOPPED
            self.ctl.state.message = "Ctrl-C on the controller"
            self.ctl._save()
            all_ids = [s.instance_id for _, s in alive]
            self.ctl._say(f"terminated {', '.join(all_ids)} (its shutdown sends SIGTERM, so the command "
                      f"commits a checkpoint). Checkpoints are kept at {url}. "
                      f"Resume with: spotrun launch --resume {url}")
            return LaunchOutcome(RunStatus.STOPPED, 130, "Ctrl-C", len(self.ctl.state.segments), self.ctl.state.interruptions)
        self.ctl._save()
        regions = ", ".join(by_region)
        commands = "; ".join(f"aws ec2 terminate-instances --region {region} --instance-ids {' '.join(ids)}"
                             for region, ids in by_region.items())
        self.ctl._say(f"left running: {desc} in {regions}; it keeps training into {url} but nothing "
                  f"relaunches it now. Watch it again: spotrun launch --resume {url}; stop it: "
                  f"spotrun stop {url} (or {commands})")
        return LaunchOutcome(RunStatus.DETACHED, 130, "Ctrl-C, instance left running", len(self.ctl.state.segments),
                             self.ctl.state.interruptions)

    def left_running(self, exc: BaseException) -> None:
        """The controller is dying of an error: say what may still run and how to stop it."""
        running = self.ctl.state.running
        url = self.ctl.storage.display()
        with contextlib.suppress(Exception):
            self.ctl.state.message = f"controller stopped: {exc}"
            self.ctl._save()
        if running:
            cur = running[0]
            what = (f"instance {cur.instance_id} ({cur.instance_type}, {cur.market})" if len(running) == 1 else
                    f"instances {', '.join(s.instance_id for s in running)} ({cur.instance_type}, {cur.market})")
            self.ctl._say(f"controller error ({exc}); {what} in {cur.region or self.ctl.home} may still be running. "
                      f"Watch it again: spotrun launch --resume {url}; stop it: spotrun stop {url}",
                      LaunchEventKind.WARNING)

    def wait_gone(self, segs: list[Segment], timeout: float) -> dict[str, InstanceStatus]:
        end = self.ctl.clock() + timeout
        statuses = self.ctl._describe(segs)
        while any(s.alive for s in statuses.values()) and self.ctl.clock() < end:
            self.ctl.sleep(min(self.ctl.timing.poll_s, max(0.0, end - self.ctl.clock())))
            statuses = self.ctl._describe(segs)
        return statuses
