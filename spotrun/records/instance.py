"""Where a segment of the run executes: which cloud, instance, zone and market."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["InstanceInfo"]


@dataclass(frozen=True)
class InstanceInfo:
    """The machine a process runs on, as far as it could learn.

    ``market`` is ``"spot"``, ``"on-demand"`` or ``"local"`` (not on a cloud machine, or
    the metadata service could not be reached).
    """

    cloud: str = "local"
    instance_id: str = "local"
    instance_type: str | None = None
    region: str | None = None
    availability_zone: str | None = None
    market: str = "local"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstanceInfo:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)
