"""The one grouping of a run's cost segments into attempts, for the restart attribution
(:mod:`.report`) and the recovery split (:mod:`.recovery`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import SegmentCost

__all__ = ["group_attempts"]


def group_attempts(segments: list[SegmentCost]) -> list[list[SegmentCost]]:
    """The segments grouped by attempt (a multi-node group is one), in start order. A spare
    no attempt used (``unused``) is in none, though it may carry the group it waited for."""
    out: list[list[SegmentCost]] = []
    by_group: dict[str, list[SegmentCost]] = {}
    for seg in segments:
        if seg.unused:
            continue
        if seg.group is None:
            out.append([seg])
        elif seg.group in by_group:
            by_group[seg.group].append(seg)
        else:
            by_group[seg.group] = [seg]
            out.append(by_group[seg.group])
    return out
