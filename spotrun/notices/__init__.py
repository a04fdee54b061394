"""Interruption notices: EC2 (IMDSv2), GCP and Azure metadata watchers.

A :class:`Watcher` runs in a daemon thread and hands each :class:`Notice` to a callback;
:func:`watchers_from_env` picks the watchers for this machine from the environment.
The fake metadata server for tests and the local simulator lives in
:mod:`spotrun.notices.fake_server`.
"""

from __future__ import annotations

from .azure import AzureWatcher
from .base import REBALANCE_MODES, Notice, PollingWatcher, Watcher
from .detect import NOTICE_SOURCES, detect_cloud, watchers_from_env
from .ec2 import Ec2Watcher
from .gcp import GcpWatcher

__all__ = [
    "NOTICE_SOURCES",
    "REBALANCE_MODES",
    "AzureWatcher",
    "Ec2Watcher",
    "GcpWatcher",
    "Notice",
    "PollingWatcher",
    "Watcher",
    "detect_cloud",
    "watchers_from_env",
]
