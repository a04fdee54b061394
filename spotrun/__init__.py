"""spotrun: PyTorch training that survives spot interruptions, and a bill that says what spot saved."""

from __future__ import annotations

__version__ = "0.1.0"
