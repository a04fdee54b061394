"""Why ``spotrun check-resume`` failed: where the two runs first diverge, and the likely cause.

The interrupted run runs exactly the uninterrupted run's code until its first resume, so
its state can only part from the reference's at a resume (or through nondeterminism, which
shows before any resume). Both runs keep every checkpoint in check-resume mode; comparing
the checkpoints they share, oldest first, finds the first step whose state differs, and
what differs there says what the script did not save:

* an RNG entry: random numbers drawn outside the saved state (before the first step after a
  restore, e.g. a batch prefetched before the loop; or a generator nobody saves);
* the data position (a per-rank loader entry): the loader;
* weights or optimizer state while RNG and data match, right after a resume: step-local
  state the checkpoint does not hold (a prefetched batch, a carried hidden state, an EMA).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..format.commit import list_checkpoints
from ..storage import Storage
from .diff import diff_state, state_at

__all__ = ["Divergence", "entry_under", "find_divergence", "rng_entries_never_drawn"]

#: Entries printed for the first differing step (the rest are counted).
_SHOWN = 8


@dataclass
class Divergence:
    """The first checkpoint step where the runs differ."""

    step: int
    last_equal: int | None  # the newest shared step before it where the runs were equal
    resumed_from: list[int]  # resumes of the interrupted run in [last_equal, step)
    entries: list[str]  # what differs at ``step``, most telling first
    cause: str

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "last_equal_step": self.last_equal,
                "resumed_from": self.resumed_from, "entries": self.entries, "cause": self.cause}

    def lines(self) -> list[str]:
        where = (f"equal at step {self.last_equal}" if self.last_equal is not None
                 else "no earlier shared checkpoint")
        if self.resumed_from:
            where += f", resumed from step {', '.join(map(str, self.resumed_from))}"
        out = [f"first difference at step {self.step} ({where}); there:"]
        out += [f"  {e}" for e in self.entries[:_SHOWN]]
        if len(self.entries) > _SHOWN:
            out.append(f"  ... and {len(self.entries) - _SHOWN} more")
        out.append(f"likely cause: {self.cause}")
        return out


def _path(difference: str) -> str:
    return difference.split(":", 1)[0]


def entry_under(difference: str, prefixes: Iterable[str]) -> bool:
    path = _path(difference)
    return any(path == p or path.startswith((p + ".", p + "[")) for p in prefixes)


def _kind(difference: str) -> str:
    path = _path(difference)
    if ".rng." in path:
        return "rng"
    if ".per_rank." in path:
        return "data"
    if ".values." in path:
        return "values"
    return "state"


_ORDER = {"rng": 0, "data": 1, "values": 2, "state": 3}


def _committed(storage: Storage) -> dict[int, Any]:
    return {c.step: c.manifest for c in list_checkpoints(storage)
            if c.status == "committed" and c.manifest is not None}


def _fingerprint(obj: Any) -> Any:
    """A hashable stand-in for an RNG state (tuples, dicts, tensors), equal iff equal."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", str(obj.dtype), tuple(obj.shape), obj.cpu().contiguous().numpy().tobytes())
    if isinstance(obj, dict):
        return tuple(sorted((str(k), _fingerprint(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_fingerprint(v) for v in obj)
    return obj


def rng_entries_never_drawn(reference: Storage, candidate: Storage) -> list[str]:
    """RNG entries (``rank-00000.rng.python``) that hold one state throughout each run.

    Nothing draws from such an RNG after the first checkpoint, so a difference between the
    runs is where each process happened to start (an unseeded Python or NumPy RNG that the
    script never uses), not a resume that went wrong. The interrupted run must have at
    least two checkpoints for this to say anything.
    """
    runs: list[dict[str, set]] = []
    for storage in (reference, candidate):
        seen: dict[str, set] = {}
        checkpoints = _committed(storage)
        if storage is candidate and len(checkpoints) < 2:
            return []
        for step, manifest in sorted(checkpoints.items()):
            for rank, payload in state_at(storage, step, manifest).items():
                rng = payload.get("rng") if isinstance(payload, dict) else None
                for kind, value in (rng or {}).items():
                    seen.setdefault(f"{rank}.rng.{kind}", set()).add(_fingerprint(value))
        runs.append(seen)
    paths = set(runs[0]) & set(runs[1])
    return sorted(p for p in paths if len(runs[0][p]) == 1 and len(runs[1][p]) == 1)


def find_divergence(reference: Storage, candidate: Storage, resumes: Sequence[int],
                    *, ignore: Sequence[str] = ()) -> Divergence | None:
    """Compare the checkpoints both runs committed, oldest first; the first that differs.

    ``resumes``: the steps the interrupted run resumed from. ``ignore``: entry paths to
    leave out (RNGs nothing draws from). None when every shared checkpoint is equal.
    """
    ref, cand = _committed(reference), _committed(candidate)
    last_equal: int | None = None
    for step in sorted(set(ref) & set(cand)):
        a = state_at(reference, step, ref[step])
        b = state_at(candidate, step, cand[step])
        found = [d for d in diff_state(a, b) if not entry_under(d, ignore)]
        if not found:
            last_equal = step
            continue
        found.sort(key=lambda d: _ORDER[_kind(d)])  # stable: each kind keeps its order
        lo = last_equal if last_equal is not None else 0
        near = sorted({r for r in resumes if lo <= r < step})
        has_rng = any(isinstance(p, dict) and "rng" in p for p in a.values())
        return Divergence(step, last_equal, near, found,
                          _cause(found, step, last_equal, near, resumes, has_rng))
    return None


def _names(found: list[str], kind: str) -> str:
    paths = [_path(d) for d in found if _kind(d) == kind]
    return ", ".join(paths[:3]) + (f" (+{len(paths) - 3})" if len(paths) > 3 else "")


def _cause(found: list[str], step: int, last_equal: int | None, near: list[int],
           resumes: Sequence[int], has_rng: bool) -> str:
    kinds = {_kind(d) for d in found}
    if not near:
        if not any(r < step for r in resumes):
            if "rng" in kinds:
                return (f"{_names(found, 'rng')} already differ(s) at step {step}, before any "
                        "resume: that RNG starts differently in each run; seed it at start-up "
                        "(e.g. spotrun.seed_everything(0))")
            return (f"the runs differ at step {step}, before any resume: the script is not "
                    "deterministic from one run to the next (seed every RNG, "
                    "torch.use_deterministic_algorithms(True), no randomness in DataLoader "
                    "workers); two uninterrupted runs would differ too")
        return (f"the runs were equal at step {last_equal}, after the last resume before it, "
                f"and differ at step {step}: state that is not saved and only acts later (a "
                "counter, something updated at epoch ends), or nondeterminism")
    where = f"at the first shared checkpoint after the resume from step {near[-1]}"
    if not has_rng:
        return (f"the checkpoints hold no RNG state (save_rng=False), so the random numbers "
                f"after each resume differ from the uninterrupted run's ({where}); keep "
                "save_rng=True")
    if "rng" in kinds:
        return (f"RNG state differs first ({_names(found, 'rng')}), {where}: something draws "
                "random numbers outside the saved state, e.g. between the restore and the first "
                "step (a batch prefetched before the loop: save it in values=) or from a "
                "generator not passed to the Checkpointer")
    if "data" in kinds:
        return (f"the data position differs first ({_names(found, 'data')}), {where}: the "
                "loader is not saved or not restored as used; pass it as data= "
                "(spotrun.ResumableLoader) and start iterating after the restore")
    return (f"the weights differ {where} while the RNG state and the data position match: the "
            "first step after a resume used step-local state the checkpoint does not hold: a "
            "prefetched batch, a hidden state carried across batches (LSTM), an EMA; save it "
            "with the checkpoint, e.g. values={'batch': (x, y)}")
