"""Prove that a training command resumes exactly: ``spotrun check-resume``.

Runs the command twice, each in its own fresh run folder: once without interruption, and
once interrupted ``K`` times at random moments by real signals (relaunching after each, as
a spot launcher would). Then compares the two final checkpoints entry by entry. Any
difference (a weight, an optimizer moment, an RNG state, the data position) names the state
the script fails to save or restore.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .commit import find_latest_valid
from .errors import CheckpointError, ConfigError
from .layout import DONE_MARKER, EXIT_FINISHED, EXIT_INTERRUPTED
from .snapshot import read_payload
from .storage import Storage

__all__ = ["ResumeCheck", "check_resume", "compare_checkpoints", "diff_state"]

log = logging.getLogger("spotrun")


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": "PASS" if self.passed else "FAIL",
            "differences": self.differences,
            "interruptions": self.interruptions,
            "interrupt_after_seconds": [round(t, 3) for t in self.interrupt_times],
            "uninterrupted_seconds": round(self.uninterrupted_seconds, 3),
            "interrupted_seconds": round(self.interrupted_seconds, 3),
            "final_step": self.final_step,
            "run_dirs": list(self.run_dirs),
        }


def diff_state(a: Any, b: Any, path: str = "") -> list[str]:
    """Every entry where ``a`` and ``b`` differ, as dotted paths with a short reason."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: tensor vs {type(b if isinstance(a, torch.Tensor) else a).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        if torch.equal(a, b):
            return []
        if a.is_floating_point():
            return [f"{path}: values differ (max abs diff {float((a.double() - b.double()).abs().max()):.3g})"]
        return [f"{path}: values differ"]
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{sub}: only in the {'interrupted' if key in b else 'uninterrupted'} run")
            else:
                out.extend(diff_state(a[key], b[key], sub))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(diff_state(x, y, f"{path}[{i}]"))
        # An RNG state is a long tuple: name it once, not per element.
        return [f"{path}: values differ"] if len(out) > 3 else out
    if a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        return [f"{path}: {a!r} vs {b!r}"]
    return []


def _final_state(storage: Storage) -> tuple[int, dict[str, Any]]:
    info = find_latest_valid(storage)
    if info is None or info.manifest is None:
        raise CheckpointError(f"no committed checkpoint at {storage.display()}")
    state: dict[str, Any] = {}
    for name, entry in sorted(info.manifest.files.items()):
        if not name.endswith(".pt"):
            continue  # a sharded checkpoint's DCP files: compared whole, below
        payload = read_payload(storage, info.step, name, entry)
        payload.pop("format", None)
        state[name.removesuffix(".pt")] = payload
    if info.manifest.sharded:
        from .sharded import read_full

        # Model and optimizer as the shards join up: comparable whatever the world size.
        state["sharded"] = read_full(storage, info.manifest)
    return info.step, state


def compare_checkpoints(reference: Storage, candidate: Storage) -> tuple[int, list[str]]:
    """Compare the newest valid checkpoints of two runs; returns (step, differences)."""
    step_a, a = _final_state(reference)
    step_b, b = _final_state(candidate)
    if step_a != step_b:
        return step_a, [f"final step: {step_a} (uninterrupted) vs {step_b} (interrupted)"]
    return step_a, diff_state(a, b)


def _run(cmd: Sequence[str], env: Mapping[str, str], timeout: float,
         interrupt_after: float | None = None, sig: int = signal.SIGTERM) -> tuple[int, float, bool]:
    """Run ``cmd``; optionally signal it after ``interrupt_after`` s. Returns (code, seconds, signalled)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), env=dict(env))
    signalled = False
    try:
        if interrupt_after is not None:
            try:
                proc.wait(timeout=interrupt_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
                signalled = True
        code = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
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
    return code, time.monotonic() - t0, signalled


def check_resume(
    cmd: Sequence[str],
    *,
    interruptions: int = 3,
    workdir: str | None = None,
    seed: int | None = None,
    timeout: float = 3600.0,
    env: Mapping[str, str] | None = None,
) -> ResumeCheck:
    """Run ``cmd`` uninterrupted and interrupted ``interruptions`` times; compare the results.

    ``cmd`` must read its run URL from ``$SPOTRUN_URL`` (the Checkpointer does by default).
    """
    if not cmd:
        raise ConfigError("no command given; usage: spotrun check-resume -- python train.py ...")
    if interruptions < 1:
        raise ConfigError(f"--interruptions {interruptions}: need at least 1")
    rng = random.Random(seed)
    root = workdir or tempfile.mkdtemp(prefix="spotrun-check-resume-")
    ref_dir, int_dir = os.path.join(root, "uninterrupted"), os.path.join(root, "interrupted")
    for d in (ref_dir, int_dir):
        if os.path.exists(d) and os.listdir(d):
            raise ConfigError(f"{d} is not empty; pass an empty --workdir")
    base_env = dict(os.environ if env is None else env)

    log.info("check-resume: uninterrupted run in %s", ref_dir)
    code, ref_seconds, _ = _run(cmd, {**base_env, "SPOTRUN_URL": ref_dir}, timeout)
    if code != EXIT_FINISHED:
        raise CheckpointError(f"the uninterrupted run exited with code {code}; fix the command first")
    if not Storage(ref_dir).exists(DONE_MARKER):
        raise CheckpointError(
            "the uninterrupted run exited 0 but wrote no done marker; does the script use "
            "Checkpointer.range() or call finish()?"
        )

    total = 0.0
    times: list[float] = []
    done = False
    for i in range(interruptions):
        # Anywhere from start-up to near the end of a whole run: some land in imports or
        # restore, most mid-training. Later attempts resume, so they have less left to do.
        after = rng.uniform(0.15, 0.85) * ref_seconds
        code, secs, signalled = _run(cmd, {**base_env, "SPOTRUN_URL": int_dir}, timeout, after)
        total += secs
        times.append(after)
        log.info("check-resume: interruption %d after %.2fs -> exit %d", i + 1, after, code)
        if not signalled and code == EXIT_FINISHED:
            done = True
            break
        if code not in (EXIT_INTERRUPTED, -signal.SIGTERM, EXIT_FINISHED):
            raise CheckpointError(f"interrupted attempt {i + 1} exited with code {code}, not {EXIT_INTERRUPTED}")
    while not done:
        code, secs, _ = _run(cmd, {**base_env, "SPOTRUN_URL": int_dir}, timeout)
        total += secs
        if code != EXIT_FINISHED:
            raise CheckpointError(f"the resumed run exited with code {code}")
        done = True

    step, differences = compare_checkpoints(Storage(ref_dir), Storage(int_dir))
    return ResumeCheck(
        passed=not differences,
        differences=differences,
        interruptions=len(times),
        uninterrupted_seconds=ref_seconds,
        interrupted_seconds=total,
        final_step=step,
        run_dirs=(ref_dir, int_dir),
        interrupt_times=times,
    )
