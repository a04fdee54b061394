"""Human-readable units for what spotrun prints (torch-free, no imports beyond the stdlib)."""

from __future__ import annotations

__all__ = ["format_bytes"]

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, three significant figures where it matters:
    ``512 B``, ``1.5 KiB``, ``12.3 MiB``, ``4.00 GiB``. A small state never reads ``0.0 MB``."""
    if n < 1024:
        return f"{int(n)} B"
    size = float(n)
    for unit in _UNITS:
        size /= 1024
        # 1023.6 KiB would print as "1024 KiB": that is 1.00 MiB.
        if size < 1023.5 or unit == _UNITS[-1]:
            if size >= 99.95:
                return f"{size:.0f} {unit}"
            if size >= 9.995:
                return f"{size:.1f} {unit}"
            return f"{size:.2f} {unit}"
    raise AssertionError("unreachable")
