"""The training-loop wrapper and its parts.

``checkpointer`` is the loop (restore, step, finish); ``saver`` writes and commits;
``interrupts`` turns signals and notices into flags the loop reads at step boundaries.
"""

from .checkpointer import Checkpointer

__all__ = ["Checkpointer"]
