"""The training-loop wrapper and its parts.

``checkpointer`` is the loop (restore, step, finish), a composition of: ``training_state``
(what is saved: named objects, per-rank objects, values), ``segment`` (what every wrapper
shares, the trainer integrations too: lease, signals and notices, ledger, the bounded stop,
the done marker), ``saver`` (writes and commits), ``restore`` (finds the newest valid
checkpoint and loads it, with progress lines), ``interrupts`` (signals and notices become
flags the loop reads at step boundaries) and ``artifacts`` (local files kept with the state).
"""

from .checkpointer import Checkpointer

__all__ = ["Checkpointer"]
