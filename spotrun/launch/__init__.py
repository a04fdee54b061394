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

from ..records.launch_state import LaunchState, Segment, load_state
from .base import (
    Backend,
    Launcher,
    LaunchEvent,
    LaunchEventKind,
    LaunchOutcome,
    backend_for,
)
from .book import RunBook
from .controller import Ec2Controller, Ec2Options, Timing
from .ec2 import Ec2Api, Pool
from .local import LocalLauncher, LocalOptions, default_run_url
from .status import format_status, run_status, stop_run
from .userdata import build_user_data, check_no_secrets

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
