"""Prove that a training command resumes exactly: ``spotrun check-resume``.

Runs the command twice, each in its own fresh run folder: once without interruption, and
once interrupted ``K`` times by real signals (relaunching after each, as a spot launcher
would). Then compares the two final checkpoints entry by entry. Any difference (a weight, an
optimizer moment, an RNG state, the data position) names the state the script fails to save
or restore.

An interruption counts only when it exercised a resume: the attempt was signalled after it
had started training, exited ``EXIT_INTERRUPTED`` and left a checkpoint newer than the one it
resumed from. Each signal lands at a random point of what is left of the run (estimated from
the uninterrupted run's pace), after the attempt's restore, so slow imports cannot swallow
it. Fewer than ``K`` delivered interruptions is never a PASS.

Both runs keep every checkpoint (retention off), so on a FAIL the runs are compared step by
step (:mod:`spotrun.proof.diagnosis`): the first step whose state differs, the entries that
differ first and the likely cause.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..format.commit import KEEP_ALL_ENV, find_latest_valid, list_checkpoints
from ..records.layout import DCP_METADATA, DONE_MARKER, EXIT_FINISHED, EXIT_INTERRUPTED, LEDGER_DIR
from ..storage import Storage
from .diagnosis import (
    Divergence,
    entry_under,
    find_divergence,
    rng_entries_never_drawn,
)
from .diff import artifact_names, diff_state, file_differences, is_payload, state_at

__all__ = ["Interruption", "ResumeCheck", "check_resume", "compare_checkpoints", "diff_state"]

log = logging.getLogger(__name__)

#: How often an attempt is polled for the start of its training (ledger) and its exit.
_POLL_S = 0.05


@dataclass
class Interruption:
    """One delivered interruption: signalled ``after_seconds`` into training, resumed later."""

    attempt: int
    after_seconds: float
    from_step: int  # the step the attempt resumed from (0: a fresh start)
    to_step: int  # the newest committed step when it exited 75

    def to_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "after_seconds": round(self.after_seconds, 3),
                "from_step": self.from_step, "to_step": self.to_step}


@dataclass
class ResumeCheck:
    passed: bool
    differences: list[str]
    interruptions: int
    uninterrupted_seconds: float
    interrupted_seconds: float
    final_step: int
    run_dirs: tuple[str, str]
    interrupt_times: list[float] = field(default_factory=list)
    #: How many interruptions were asked for; ``interruptions`` is how many were delivered.
    requested: int = 0
    delivered: list[Interruption] = field(default_factory=list)
    #: Attempts that were not counted, one line each (finished before the signal, killed
    #: before a checkpoint...).
    not_counted: list[str] = field(default_factory=list)
    #: RNG entries that differ but never change within either run (nothing draws from them).
    ignored: list[str] = field(default_factory=list)
    divergence: Divergence | None = None
    #: Whether ``run_dirs`` still exist: a temporary working folder is removed on PASS.
    kept: bool = True

    @property
    def complete(self) -> bool:
        """Were all the requested interruptions delivered?"""
        return self.interruptions >= self.requested

    @property
    def verdict(self) -> str:
        if self.differences:
            return "FAIL"
        return "PASS" if self.complete else "INCOMPLETE"

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.verdict,
            "differences": self.differences,
            "interruptions": self.interruptions,
            "interruptions_requested": self.requested,
            "interrupted_attempts": [i.to_dict() for i in self.delivered],
            "not_counted": self.not_counted,
            "ignored": self.ignored,
            "divergence": None if self.divergence is None else self.divergence.to_dict(),
            "interrupt_after_seconds": [round(t, 3) for t in self.interrupt_times],
            "uninterrupted_seconds": round(self.uninterrupted_seconds, 3),
            "interrupted_seconds": round(self.interrupted_seconds, 3),
            "final_step": self.final_step,
            "run_dirs": list(self.run_dirs),
            "kept": self.kept,
        }


def _final(storage: Storage) -> tuple[int, Any]:
    info = find_latest_valid(storage)
    if info is None or info.manifest is None:
        raise CheckpointError(f"no committed checkpoint at {storage.display()}")
    return info.step, info.manifest


def compare_checkpoints(reference: Storage, candidate: Storage) -> tuple[int, list[str]]:
    """Compare the newest valid checkpoints of two runs; returns (step, differences).

    spotrun's payloads (and a sharded checkpoint's state, joined up) entry by entry; every
    other file (a trainer's own: ``model.safetensors``, Accelerate's ``.bin``/``.pkl``,
    artifacts) file by file: equal checksums, else its contents where they load safely.
    """
    step_a, man_a = _final(reference)
    step_b, man_b = _final(candidate)
    if step_a != step_b:
        return step_a, [f"final step: {step_a} (uninterrupted) vs {step_b} (interrupted)"]
    differences = diff_state(state_at(reference, step_a, man_a),
                             state_at(candidate, step_b, man_b))

    artifacts = artifact_names(man_a) | artifact_names(man_b)

    def compared_above(name: str) -> bool:
        return (is_payload(name, artifacts) or name.endswith(".distcp")
                or name == DCP_METADATA)

    differences += file_differences(reference, dict(man_a.files), candidate, dict(man_b.files),
                                    step_a, skip=compared_above)
    return step_a, differences


def _newest_committed(storage: Storage) -> int:
    steps = [c.step for c in list_checkpoints(storage) if c.status == "committed"]
    return max(steps, default=0)


class _LedgerWatch:
    """Reads a run's ledger records written since a moment, each record once."""

    def __init__(self, storage: Storage, since: float) -> None:
        self.storage = storage
        # Record names start with their event time in ns: skip older ones without reading.
        self._since_ns = int((since - 1.0) * 1e9)
        self._seen: set[str] = set()

    def new_records(self) -> list[dict]:
        out = []
        for name in sorted(self.storage.list_dir(LEDGER_DIR)):
            if name in self._seen or not name.endswith(".json"):
                continue
            try:
                if int(name.split("-", 1)[0]) < self._since_ns:
                    self._seen.add(name)
                    continue
                record = json.loads(self.storage.read_bytes(f"{LEDGER_DIR}/{name}"))
            except (ValueError, OSError):
                continue  # half-visible on a slow filesystem: read it on the next poll
            self._seen.add(name)
            if isinstance(record, dict):
                out.append(record)
        return out


def _pace(storage: Storage, final_step: int, seconds: float) -> float:
    """Seconds per step of a finished run, from its ledger (restore to finish), so start-up
    time does not inflate it; the whole run's time when the ledger does not say."""
    first = ended = None
    for r in _LedgerWatch(storage, 0.0).new_records():
        if r.get("event") == "training_resumed" and r.get("source", "wrapper") == "wrapper":
            first = float(r.get("first_step_at", r.get("time", 0.0)))
        elif r.get("event") == "segment_ended" and r.get("reason") == "finished":
            ended = float(r.get("ended_at", r.get("time", 0.0)))
    train = ended - first if first is not None and ended is not None and ended > first else seconds
    return max(train, 1e-3) / max(final_step, 1)


@dataclass
class _Attempt:
    code: int
    seconds: float
    signalled_after: float | None  # seconds after training started; None: not signalled
    started: bool  # did training start (restore done, signal handlers in place)?


def _attempt(cmd: Sequence[str], env: Mapping[str, str], timeout: float, storage: Storage,
             delay: float | None, sig: int = signal.SIGTERM) -> _Attempt:
    """Run ``cmd`` once. With ``delay``: wait until the run's ledger says training started
    (after the restore, with the Checkpointer's handlers installed), then signal it
    ``delay`` seconds later, unless it has exited by then."""
    t0 = time.monotonic()
    # This attempt's own segment id, so an earlier attempt's ledger records never count.
    segment = f"check-resume-{uuid.uuid4().hex[:8]}"
    watch = _LedgerWatch(storage, time.time()) if delay is not None else None
    proc = subprocess.Popen(list(cmd), env={**env, "SPOTRUN_SEGMENT_ID": segment})
    signalled_after: float | None = None
    started = False

    def left() -> float:
        remaining = timeout - (time.monotonic() - t0)
        if remaining <= 0:
            raise subprocess.TimeoutExpired(list(cmd), timeout)
        return remaining

    try:
        if watch is not None:
            began: float | None = None  # wall-clock time training began, from the ledger
            while began is None:
                exited = proc.poll() is not None  # then one last look at the ledger
                for r in watch.new_records():
                    if r.get("event") == "training_resumed" and r.get("segment_id") == segment:
                        began = float(r.get("first_step_at", r.get("time", time.time())))
                if exited:
                    break
                if began is None:
                    time.sleep(min(_POLL_S, left()))
            started = began is not None
            if began is not None and proc.poll() is None:
                # Counted from the record's own time: the ledger is written in the background
                # and may be seen late on a loaded machine.
                wait = max(0.0, began + delay - time.time())  # type: ignore[operator]
                try:
                    proc.wait(timeout=min(wait, left()))
                except subprocess.TimeoutExpired:
                    left()
                    proc.send_signal(sig)
                    signalled_after = max(0.0, time.time() - began)
        code = proc.wait(timeout=left())
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise CheckpointError(
            f"{' '.join(cmd)} did not finish within {timeout:.0f}s; raise --timeout"
        ) from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return _Attempt(code, time.monotonic() - t0, signalled_after, started)


def check_resume(
    cmd: Sequence[str],
    *,
    interruptions: int = 3,
    workdir: str | None = None,
    seed: int | None = None,
    timeout: float = 3600.0,
    env: Mapping[str, str] | None = None,
    keep: bool = False,
) -> ResumeCheck:
    """Run ``cmd`` uninterrupted and interrupted ``interruptions`` times; compare the results.

    ``cmd`` must read its run URL from ``$SPOTRUN_URL`` (the Checkpointer does by default).
    The result passes only when the states are equal AND every interruption was delivered.

    Both runs keep every checkpoint (a FAIL is traced step by step), so they can be large.
    Without ``workdir`` they go to a new temporary folder, removed on PASS unless ``keep``;
    on FAIL, INCOMPLETE or an error it stays (``run_dirs``; an error's message names it). A
    ``workdir`` is the caller's and is never removed.
    """
    if not cmd:
        raise ConfigError("no command given; usage: spotrun check-resume -- python train.py ...")
    if interruptions < 1:
        raise ConfigError(f"--interruptions {interruptions}: need at least 1")
    if workdir is not None:
        return _check_resume(cmd, interruptions, workdir, seed, timeout, env)
    root = tempfile.mkdtemp(prefix="spotrun-check-resume-")
    try:
        result = _check_resume(cmd, interruptions, root, seed, timeout, env)
    except Exception as exc:
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]} (both runs are kept in {root})", *exc.args[1:])
        raise
    if result.passed and not keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        result.kept = os.path.exists(root)
    return result


def _check_resume(
    cmd: Sequence[str],
    interruptions: int,
    root: str,
    seed: int | None,
    timeout: float,
    env: Mapping[str, str] | None,
) -> ResumeCheck:
    rng = random.Random(seed)
    ref_dir, int_dir = os.path.join(root, "uninterrupted"), os.path.join(root, "interrupted")
    for d in (ref_dir, int_dir):
        if os.path.exists(d) and os.listdir(d):
            raise ConfigError(f"{d} is not empty; pass an empty --workdir")
    # Every checkpoint of both runs stays, for the step-by-step comparison on a FAIL.
    base_env = {**(os.environ if env is None else env), KEEP_ALL_ENV: "1"}
    ref, cand = Storage(ref_dir), Storage(int_dir)

    log.info("check-resume: uninterrupted run in %s", ref_dir)
    first = _attempt(cmd, {**base_env, "SPOTRUN_URL": ref_dir}, timeout, ref, None)
    ref_seconds = first.seconds
    if first.code != EXIT_FINISHED:
        raise CheckpointError(f"the uninterrupted run exited with code {first.code}; fix the command first")
    if not ref.exists(DONE_MARKER):
        raise CheckpointError(
            "the uninterrupted run exited 0 but wrote no done marker; does the script use "
            "Checkpointer.range() or call finish()?"
        )
    final = _newest_committed(ref)
    pace = _pace(ref, final, ref_seconds)

    total = 0.0
    delivered: list[Interruption] = []
    not_counted: list[str] = []
    resumes: list[int] = []
    finished = False
    attempt_no = 0
    # A few spare attempts for signals that land where they cannot count (e.g. before the
    # script's first step); never an endless loop.
    while len(delivered) < interruptions and attempt_no < 2 * interruptions + 2:
        attempt_no += 1
        before = _newest_committed(cand)
        if before:
            resumes.append(before)
        # Somewhere in the first part of this attempt's share of what is left, so the later
        # interruptions still have a run to land in, and a run that goes faster than the
        # paces seen so far (less load now) is still signalled before it ends.
        share = pace * max(final - before, 1) / (interruptions - len(delivered))
        delay = rng.uniform(0.1, 0.6) * share
        a = _attempt(cmd, {**base_env, "SPOTRUN_URL": int_dir}, timeout, cand, delay)
        total += a.seconds
        after = _newest_committed(cand)
        log.info("check-resume: attempt %d from step %d: %s -> exit %d, newest checkpoint %d",
                 attempt_no, before, "not signalled" if a.signalled_after is None
                 else f"signalled {a.signalled_after:.2f}s into training", a.code, after)
        if a.signalled_after is not None and after > before:
            # This attempt's own pace (steps reached by the signal); the fastest seen wins.
            pace = min(pace, a.signalled_after / (after - before))
        if a.code != EXIT_FINISHED and cand.exists(DONE_MARKER):
            # The run finished and the signal hit its teardown (exit -15): nothing is left to
            # interrupt, and every further attempt would only find the finished run.
            finished = True
            not_counted.append(f"attempt {attempt_no} (from step {before}): the run finished "
                               f"before the signal (exit {a.code} in its teardown)")
            break
        if a.code == EXIT_FINISHED:
            finished = True
            if a.signalled_after is None:
                why = ("training never started (no training_resumed in the run's ledger)"
                       if not a.started else f"it finished before the signal (due {delay:.2f}s in)")
            else:
                why = "the signal came after its last step"
            not_counted.append(f"attempt {attempt_no} (from step {before}): {why}")
            break
        if a.code == EXIT_INTERRUPTED and a.signalled_after is not None and after > before:
            delivered.append(Interruption(attempt_no, a.signalled_after, before, after))
            continue
        if a.code in (EXIT_INTERRUPTED, -signal.SIGTERM, 128 + signal.SIGTERM):
            not_counted.append(f"attempt {attempt_no} (from step {before}): exit {a.code} "
                               f"with no checkpoint newer than step {before}")
            continue
        raise CheckpointError(f"interrupted attempt {attempt_no} exited with code {a.code}, "
                              f"not {EXIT_INTERRUPTED}; see its output above")
    while not finished:
        before = _newest_committed(cand)
        if before:
            resumes.append(before)
        a = _attempt(cmd, {**base_env, "SPOTRUN_URL": int_dir}, timeout, cand, None)
        total += a.seconds
        if a.code != EXIT_FINISHED:
            raise CheckpointError(f"the resumed run exited with code {a.code}")
        finished = True

    step, differences = compare_checkpoints(ref, cand)
    quiet: list[str] = []
    if any(".rng." in d for d in differences):
        quiet = rng_entries_never_drawn(ref, cand)
    ignored = [d for d in differences if entry_under(d, quiet)]
    differences = [d for d in differences if not entry_under(d, quiet)]
    divergence = None
    if differences and not differences[0].startswith("final step"):
        divergence = find_divergence(ref, cand, resumes, ignore=quiet)
    return ResumeCheck(
        passed=not differences and len(delivered) >= interruptions,
        differences=differences,
        interruptions=len(delivered),
        uninterrupted_seconds=ref_seconds,
        interrupted_seconds=total,
        final_step=step,
        run_dirs=(ref_dir, int_dir),
        interrupt_times=[i.after_seconds for i in delivered],
        requested=interruptions,
        delivered=delivered,
        not_counted=not_counted,
        ignored=ignored,
        divergence=divergence,
    )

