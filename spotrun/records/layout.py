"""What lives where under a run URL, and what a training process's exit code means.

This is the contract between the processes that share a run: the training script (any
rank), the launcher on the same machine or on a controller, and the CLI. Keep it stable;
change it only together with ``manifest.FORMAT_VERSION``.

::

    RUN_URL/
      000000000100/            one checkpoint per folder, named by its zero-padded step
        rank-00000.pt          payload files (written first), one per rank
        __0_0.distcp ...       sharded runs: each rank's DCP shards, and DCP's index
        .metadata                (.metadata); payload like the rest
        manifest.json          written last: its existence *is* the commit
      done.json                the run finished (written once, by rank 0)
      ledger/                  one small JSON object per event (segments, checkpoints, ...)
      launch/                  the launcher's own state (instances, attempts)
        nodes/<instance>.json  a multi-node segment's cluster file, one per node (same
                               content): rendezvous head, port and id (spotrun.launch.node)
        nodes/alive/<instance>.json  each node agent's heartbeat, overwritten every 30 s
                               (spotrun.records.heartbeat)
      logs/                    the command's output, shipped in whole chunks:
        <segment>/node-<N>/<seq>.log   (see spotrun.launch.logs)
      damaged/                 checkpoints that failed verification, moved aside as evidence
                               (``000000000015-<when>-<id>/`` with a ``damaged.json``)
      lease                    who writes the run now (owner, heartbeat, expiry): on S3 one
                               object replaced by conditional writes; elsewhere a folder of
                               numbered versions, the newest current (see spotrun.records.lease)
"""

from __future__ import annotations

import re

from ..errors import ConfigError

__all__ = [
    "DAMAGED_DIR",
    "DCP_METADATA",
    "DONE_MARKER",
    "EXIT_FAILED",
    "EXIT_FINISHED",
    "EXIT_INTERRUPTED",
    "EXIT_STOP_UNSAVED",
    "HEARTBEAT_DIR",
    "LAUNCH_DIR",
    "LEASE",
    "LEDGER_DIR",
    "LOGS_DIR",
    "MANIFEST",
    "NODES_DIR",
    "STEP_DIGITS",
    "checkpoint_dir",
    "is_temporary",
    "parse_step",
]

STEP_DIGITS = 12
MANIFEST = "manifest.json"
DONE_MARKER = "done.json"
LEDGER_DIR = "ledger"
LAUNCH_DIR = "launch"
#: The command's output, one folder per segment and node (:mod:`spotrun.launch.logs`).
LOGS_DIR = "logs"
#: Multi-node cluster files, ``NODES_DIR/<instance id>.json`` (:mod:`spotrun.launch.node`).
NODES_DIR = f"{LAUNCH_DIR}/nodes"
#: Each node agent's liveness record, ``HEARTBEAT_DIR/<instance id>.json``
#: (:mod:`spotrun.records.heartbeat`).
HEARTBEAT_DIR = f"{NODES_DIR}/alive"
#: The single-writer lease (:mod:`spotrun.records.lease`).
LEASE = "lease"
#: Where damaged checkpoint folders are moved: out of the names :func:`parse_step` takes,
#: so no save, restore or retention touches them again; kept until a person deletes them.
DAMAGED_DIR = "damaged"
#: torch.distributed.checkpoint's index file; its presence in a manifest marks a sharded
#: checkpoint.
DCP_METADATA = ".metadata"

#: The training loop ran to its end; ``done.json`` exists. Do not relaunch.
EXIT_FINISHED = 0
#: Any other failure (an exception in user code, a bad configuration). Relaunching will
#: most likely fail the same way. (Python's own exit code for an uncaught exception.)
EXIT_FAILED = 1
#: Stopped on a signal or an interruption notice after committing a checkpoint: relaunch
#: and it resumes. 75 is EX_TEMPFAIL from sysexits.h, "try again later".
EXIT_INTERRUPTED = 75
# A second Ctrl-C aborts at once with the shell's usual 128 + SIGINT = 130 (not resumable
# from the current step, but the last committed checkpoint is intact).
#: Stopped on a signal or notice, but the stop checkpoint did not commit within its bound
#: (the notice's deadline minus ``SPOTRUN_STOP_MARGIN``, or ``SPOTRUN_STOP_TIMEOUT`` after a
#: signal) or failed: the process gave up on it. The previous committed checkpoint is intact
#: and the latest, so relaunch and it resumes from there. 143 = 128 + SIGTERM, what a
#: process killed by the interruption's SIGTERM reports: the launchers (and systemd,
#: Kubernetes, torchrun) already treat it as "interrupted, relaunch".
EXIT_STOP_UNSAVED = 128 + 15


def checkpoint_dir(step: int) -> str:
    """The folder name of the checkpoint at ``step``: zero-padded so names sort like numbers."""
    if step < 0:
        raise ConfigError(f"step must be >= 0, got {step}; checkpoint steps count up from 0")
    return f"{step:0{STEP_DIGITS}d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint folder name, or None when ``name`` is not one."""
    name = name.rstrip("/")
    if len(name) == STEP_DIGITS and name.isdigit():
        return int(name)
    return None


# Temporaries of Storage's local atomic writes: ".<name>.tmp-<12 or 32 hex digits>".
_TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]{12}(?:[0-9a-f]{20})?$")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary of a local write (renamed or linked away once whole;
    one that stays was left by a writer that died)."""
    return bool(_TEMPORARY.match(name))
