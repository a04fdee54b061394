"""Keep a training command running until its run is done: on EC2 spot, or simulated locally.

* :class:`LocalLauncher` (``spotrun launch --local``): runs the command here as a child,
  playing spot with a fake EC2 metadata service, notices, SIGTERM and restarts.
* :class:`Ec2Controller` (``spotrun launch --run-url s3://... --instance-types ...``):
  instant fleets across pools, relaunch after interruptions, on-demand fallback, state in
  the run URL for ``--resume``.
* :func:`run_status` / :func:`stop_run`: ``spotrun status`` and ``spotrun stop``, which reach
  the run's backend through :func:`backend_for` (the mode recorded in its launch state).

Both are backends of one shape (:mod:`.base`): a :class:`Launcher` whose ``run()`` returns a
:class:`LaunchOutcome` and reports :class:`LaunchEvent` values (the CLI prints them), and a
:class:`Backend` for ``status``/``stop``. Both record every segment through one
:class:`RunBook` (launch state, then the run ledger with source ``"launcher"``) and set
``SPOTRUN_SEGMENT_ID`` so the wrapper's own records join it. See ``docs/launch.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# A node agent (`python -m spotrun.launch.node`) imports this package first; it needs neither
# the EC2 controller nor the cost renderers that status pulls in (~0.5 s of a replacement
# node's start on a quiet 2-core machine, seconds under load), so names load on first use.
_EXPORTS = {
    "LaunchState": "..records.launch_state",
    "Segment": "..records.launch_state",
    "load_state": "..records.launch_state",
    "Backend": ".base",
    "Launcher": ".base",
    "LaunchEvent": ".base",
    "LaunchEventKind": ".base",
    "LaunchOutcome": ".base",
    "backend_for": ".base",
    "RunBook": ".book",
    "Ec2Controller": ".controller",
    "Ec2Options": ".controller",
    "Timing": ".controller",
    "Ec2Api": ".ec2",
    "Pool": ".ec2",
    "LocalLauncher": ".local",
    "LocalOptions": ".local",
    "default_run_url": ".local",
    "format_status": ".status",
    "run_status": ".status",
    "stop_run": ".status",
    "build_user_data": ".userdata",
    "check_no_secrets": ".userdata",
}

if TYPE_CHECKING:
    from ..records.launch_state import LaunchState, Segment, load_state
    from .base import Backend, Launcher, LaunchEvent, LaunchEventKind, LaunchOutcome, backend_for
    from .book import RunBook
    from .controller import Ec2Controller, Ec2Options, Timing
    from .ec2 import Ec2Api, Pool
    from .local import LocalLauncher, LocalOptions, default_run_url
    from .status import format_status, run_status, stop_run
    from .userdata import build_user_data, check_no_secrets


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, globals())


__all__ = [
    "Backend",
    "Ec2Api",
    "Ec2Controller",
    "Ec2Options",
    "LaunchEvent",
    "LaunchEventKind",
    "LaunchOutcome",
    "LaunchState",
    "Launcher",
    "LocalLauncher",
    "LocalOptions",
    "Pool",
    "RunBook",
    "Segment",
    "Timing",
    "backend_for",
    "build_user_data",
    "check_no_secrets",
    "default_run_url",
    "format_status",
    "load_state",
    "run_status",
    "stop_run",
]
