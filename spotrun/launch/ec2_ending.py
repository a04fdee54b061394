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

from ..records.events import EndReason
from ..records.launch_state import STOP_FILE, RunStatus, Segment
from .attempt import Verdict, finished_detail
from .base import LaunchEventKind, LaunchOutcome
from .ec2 import InstanceStatus

if TYPE_CHECKING:
    from .controller import Ec2Controller

__all__ = ["Ec2Ending"]


class Ec2Ending:
    """The ways out of ``ctl``'s run (see the module docstring)."""

    def __init__(self, ctl: Ec2Controller) -> None:
        self.ctl = ctl

    def finish(self) -> LaunchOutcome:
        ctrl = self.ctl
        ctrl.early.discard("the run finished")
        ctrl.grow.discard("the run finished")
        attempt = ctrl.state.running
        if attempt:
            statuses = self.wait_gone(attempt, ctrl.timing.finish_grace_s)
            alive = [s for s in attempt if statuses[s.instance_id].alive]
            if alive:
                ctrl._say(f"terminating {', '.join(s.instance_id for s in alive)}: the run is done but "
                          f"{'it' if len(alive) == 1 else 'they'} did not shut down")
                ctrl._terminate(alive)
            for seg in attempt:
                ended_at = None if seg in alive else ctrl._gone_at(seg, statuses[seg.instance_id])
                code = ctrl._read_exit_record(seg)
                detail = ctrl._warn_finished(Verdict(EndReason.FINISHED, finished_detail(code)), code)
                ctrl._end_segment(seg, EndReason.FINISHED, exit_code=code, detail=detail, ended_at=ended_at)
        ctrl.capacity.cleanup()
        ctrl.state.status = RunStatus.FINISHED
        ctrl.state.message = "done.json written"
        ctrl._save()
        ctrl._say(f"run finished after {len(ctrl.state.segments)} segment(s), "
                  f"{ctrl.state.interruptions} interruption(s)", LaunchEventKind.OUTCOME)
        return LaunchOutcome(RunStatus.FINISHED, 0, "finished", len(ctrl.state.segments), ctrl.state.interruptions)

    def give_up(self, status: str, why: str, *, exit_code: int) -> LaunchOutcome:
        ctrl = self.ctl
        ctrl.early.discard(f"the run {status}")
        ctrl.grow.discard(f"the run {status}")
        attempt = ctrl.state.running
        if attempt:
            ctrl._terminate(attempt)
            for seg in attempt:
                reason = EndReason.STOPPED if status == RunStatus.STOPPED else EndReason.FAILED
                ctrl._end_segment(seg, reason, detail=why)
        ctrl.capacity.cleanup()
        ctrl.state.status = status
        ctrl.state.message = why
        ctrl._save()
        ctrl._say(f"run {status}: {why}", LaunchEventKind.OUTCOME)
        return LaunchOutcome(status, exit_code, why, len(ctrl.state.segments), ctrl.state.interruptions)

    def terminate_all(self) -> list[str]:
        """Terminate every instance of the run, in every region used (what ``stop`` does)."""
        ctrl = self.ctl
        found: dict[str, list[str]] = {}
        for region, s in ctrl._alive_everywhere(("pending", "running", "stopping", "stopped")):
            found.setdefault(region, []).append(s.instance_id)
        for region, ids in found.items():
            ctrl._api(region).terminate(ids)
        return [i for ids in found.values() for i in ids]

    def stopped_by_request(self) -> LaunchOutcome:
        ctrl = self.ctl
        ctrl.storage.remove(STOP_FILE)
        self.terminate_all()
        return self.give_up(RunStatus.STOPPED, "stopped by spotrun stop; checkpoints kept", exit_code=0)

    def budget_stop(self, why: str) -> LaunchOutcome:
        """Stop as ``spotrun stop`` does (the shutdown SIGTERMs the command, which commits)."""
        ctrl = self.ctl
        url = ctrl.storage.display()
        self.terminate_all()
        return self.give_up(RunStatus.STOPPED, f"{why}; checkpoints kept. To continue, raise the limit: "
                             f"spotrun launch --resume {url} --max-cost USD", exit_code=1)

    def ctrl_c(self) -> LaunchOutcome:
        """Never leave an instance running without saying so (see ``on_ctrl_c``)."""
        ctrl = self.ctl
        url = ctrl.storage.display()
        with contextlib.suppress(Exception):  # an early replacement never trained: not left running
            ctrl.early.discard("Ctrl-C on the controller")
            ctrl.grow.discard("Ctrl-C on the controller")
        try:
            alive = ctrl._alive_everywhere()
        except Exception as exc:  # noqa: BLE001 - we must still say something useful
            running = ctrl.state.running
            ids = ", ".join(s.instance_id for s in running)
            ctrl._say(f"interrupted; could not list the run's instances ({exc}). "
                      f"{'Instance ' + ids + ' may still be running. ' if running else ''}"
                      f"Stop everything with: spotrun stop {url}")
            return LaunchOutcome(RunStatus.DETACHED, 130, "interrupted", len(ctrl.state.segments),
                                 ctrl.state.interruptions)
        if not alive:
            ctrl._say(f"interrupted; no instance is running for this run. Resume with: spotrun launch --resume {url}")
            ctrl._save()
            return LaunchOutcome(RunStatus.DETACHED, 130, "interrupted", len(ctrl.state.segments),
                                 ctrl.state.interruptions)
        desc = ", ".join(f"{s.instance_id} ({s.instance_type} {s.market} in {s.availability_zone})" for _, s in alive)
        choice = ctrl.on_ctrl_c(desc) if callable(ctrl.on_ctrl_c) else ctrl.on_ctrl_c
        if choice not in ("terminate", "leave"):
            choice = "terminate"  # never leave compute running unless told to
        by_region: dict[str, list[str]] = {}
        for region, s in alive:
            by_region.setdefault(region, []).append(s.instance_id)
        if choice == "terminate":
            for region, ids in by_region.items():
                ctrl._api(region).terminate(ids)
            for seg in ctrl.state.running:
                ctrl._end_segment(seg, EndReason.STOPPED, detail="Ctrl-C on the controller")
            ctrl.state.status = RunStatus.STOPPED
            ctrl.state.message = "Ctrl-C on the controller"
            ctrl._save()
            all_ids = [s.instance_id for _, s in alive]
            ctrl._say(f"terminated {', '.join(all_ids)} (its shutdown sends SIGTERM, so the command "
                      f"commits a checkpoint). Checkpoints are kept at {url}. "
                      f"Resume with: spotrun launch --resume {url}")
            return LaunchOutcome(RunStatus.STOPPED, 130, "Ctrl-C", len(ctrl.state.segments), ctrl.state.interruptions)
        ctrl._save()
        regions = ", ".join(by_region)
        commands = "; ".join(f"aws ec2 terminate-instances --region {region} --instance-ids {' '.join(ids)}"
                             for region, ids in by_region.items())
        ctrl._say(f"left running: {desc} in {regions}; it keeps training into {url} but nothing "
                  f"relaunches it now. Watch it again: spotrun launch --resume {url}; stop it: "
                  f"spotrun stop {url} (or {commands})")
        return LaunchOutcome(RunStatus.DETACHED, 130, "Ctrl-C, instance left running", len(ctrl.state.segments),
                             ctrl.state.interruptions)

    def left_running(self, exc: BaseException) -> None:
        """The controller is dying of an error: say what may still run and how to stop it."""
        ctrl = self.ctl
        running = ctrl.state.running
        url = ctrl.storage.display()
        with contextlib.suppress(Exception):
            ctrl.early.discard(f"the controller stopped: {exc}")
            ctrl.grow.discard(f"the controller stopped: {exc}")
        with contextlib.suppress(Exception):
            ctrl.state.message = f"controller stopped: {exc}"
            ctrl._save()
        if running:
            cur = running[0]
            what = (f"instance {cur.instance_id} ({cur.instance_type}, {cur.market})" if len(running) == 1 else
                    f"instances {', '.join(s.instance_id for s in running)} ({cur.instance_type}, {cur.market})")
            ctrl._say(f"controller error ({exc}); {what} in {cur.region or ctrl.home} may still be running. "
                      f"Watch it again: spotrun launch --resume {url}; stop it: spotrun stop {url}",
                      LaunchEventKind.WARNING)

    def wait_gone(self, segs: list[Segment], timeout: float) -> dict[str, InstanceStatus]:
        ctrl = self.ctl
        end = ctrl.clock() + timeout
        statuses = ctrl._describe(segs)
        while any(s.alive for s in statuses.values()) and ctrl.clock() < end:
            ctrl.sleep(min(ctrl.timing.poll_s, max(0.0, end - ctrl.clock())))
            statuses = ctrl._describe(segs)
        return statuses
