"""EC2's part in ``spotrun status`` and ``spotrun stop``: what runs, and how to end it, from
the run URL alone (with or without a live controller)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

from ..procfs import pid_gone
from ..records.launch_state import STOP_FILE, LaunchState, RunStatus, Segment, load_state
from ..storage import Storage
from .book import close_books
from .ec2 import Ec2Api

__all__ = ["EC2_BACKEND", "Ec2Backend"]


class Ec2Backend:
    """EC2's part in ``spotrun status`` and ``spotrun stop`` (see :class:`~.base.Backend`)."""

    mode = "ec2"

    @staticmethod
    def _regions(state: LaunchState) -> list[str | None]:
        """Every region the run may have instances in (home first; None: the SDK's default
        region): the same list the controller searches, so ``stop`` finds what it started."""
        return state.regions_used(state.options.get("region"))

    def current_details(self, state: LaunchState, segment: Segment, *, live: bool) -> dict[str, Any]:
        if not live:
            return {}
        try:
            region = segment.region or self._regions(state)[0]
            return {"state": Ec2Api.for_region(region).describe(segment.instance_id).state}
        except Exception as exc:  # noqa: BLE001 - status must work without AWS access
            return {"state_error": str(exc)}

    def nodes_details(self, state: LaunchState, segments: list[Segment], *, live: bool) -> dict[str, dict[str, Any]]:
        """:meth:`current_details` for every node of the running attempt: one call per region."""
        out: dict[str, dict[str, Any]] = {s.instance_id: {} for s in segments}
        if not live:
            return out
        home = self._regions(state)[0]
        by_region: dict[str | None, list[str]] = {}
        for seg in segments:
            by_region.setdefault(seg.region or home, []).append(seg.instance_id)
        for region, ids in by_region.items():
            try:
                for iid, st in Ec2Api.for_region(region).describe_many(ids).items():
                    out[iid] = {"state": st.state}
            except Exception as exc:  # noqa: BLE001 - status must work without AWS access
                for iid in ids:
                    out[iid] = {"state_error": str(exc)}
        return out

    def stop(self, storage: Storage, state: LaunchState, *, wait_s: float | None,
             sleep: Callable[[float], None]) -> dict[str, Any]:
        """Ask a live controller to stop (``launch/stop.json``) and terminate every instance
        tagged with the run id in every region the run used, so it works with or without a
        controller."""
        result: dict[str, Any] = {"terminated": []}
        apis = [Ec2Api.for_region(r) for r in self._regions(state)]
        alive_controller = state.controller_alive()
        if alive_controller and state.controller_host == socket.gethostname() and state.controller_pid:
            alive_controller = not pid_gone(state.controller_pid)
        storage.write_bytes(STOP_FILE, json.dumps({"requested_at": time.time()}).encode())
        for api in apis:
            ids = [s.instance_id for s in api.find_run_instances(state.run_id)
                   if s.state not in ("terminated", "shutting-down")]
            api.terminate(ids)
            result["terminated"] += ids
        if alive_controller:
            # The controller writes the ledger and the state; give it a few polls to notice.
            deadline = time.time() + (wait_s if wait_s is not None else max(30.0, 3 * (state.poll_s or 0)))
            while time.time() < deadline:
                fresh = load_state(storage)
                if fresh is not None and fresh.status != RunStatus.RUNNING:
                    result["controller"] = "acknowledged"
                    return result
                sleep(0.5)
            result["controller"] = "no answer"
        close_books(storage, state)
        return result


EC2_BACKEND = Ec2Backend()
