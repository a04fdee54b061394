"""The public surface, pinned: what users import from spotrun and its documented packages.

A name leaving one of these lists (or a module moving without its names) breaks user code;
this test makes that a decision, not an accident. Rooms inside the package (records/,
format/, proof/, ...) may move freely; these names may not.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC = {
    "spotrun": [
        "CapacityError", "CheckpointError", "CheckpointInfo", "Checkpointer", "ConfigError",
        "CorruptCheckpointError", "CostError", "CredentialsError", "EXIT_FAILED", "EXIT_FINISHED",
        "EXIT_INTERRUPTED", "IncompatibleCheckpointError", "InstanceInfo", "LaunchError",
        "NoCheckpointError", "NoticeError", "PriceUnavailableError", "ResumableLoader", "SaveError",
        "SpotrunError", "Storage", "StorageError", "StorageNotFoundError", "StorageURLError",
        "UnsupportedFormatError", "__version__", "find_latest_valid", "list_checkpoints",
        "open_storage", "seed_everything", "verify_checkpoint",
    ],
    "spotrun.cost": [
        "CostReport", "JobEstimate", "PortfolioResult", "Price", "PriceBook", "SegmentCost",
        "build_segments", "estimate_job", "evaluate_portfolio", "load_toml", "rate_per_hour",
        "report_for_run", "report_html", "report_text", "time_weighted_average", "young_interval",
    ],
    "spotrun.storage": [
        "Backend", "FsspecBackend", "HashingWriter", "LocalBackend", "MiB", "ObjectStoreBackend",
        "S3Backend", "Storage", "URL_ENV", "available_backends", "backend_class", "open_storage",
        "register_backend", "translate_errors",
    ],
    "spotrun.notices": [
        "AzureWatcher", "Ec2Watcher", "GcpWatcher", "NOTICE_SOURCES", "Notice", "PollingWatcher",
        "REBALANCE_MODES", "Watcher", "detect_cloud", "watchers_from_env",
    ],
    # The trainer integrations (their extras are installed by `make test`).
    "spotrun.integrations.hf": ["SpotrunCallback", "train"],
    "spotrun.integrations.lightning": ["SpotrunCallback", "SpotrunCheckpointIO"],
    "spotrun.integrations.accelerate": ["SpotrunAccelerate"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_exported_names_are_pinned_and_resolve(module):
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(PUBLIC[module])
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name


def test_documented_entry_points_still_run():
    # `python -m spotrun.distributed` (README, docs, examples) and the trainer modules.
    importlib.import_module("spotrun.integrations.compare")
    out = subprocess.run([sys.executable, "-m", "spotrun.distributed", "--help"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0 and "nproc" in out.stdout, out.stderr[-2000:]


def test_import_spotrun_stays_light():
    code = ("import sys, spotrun, spotrun.cli; "
            "print(sorted(m for m in ('torch', 'boto3', 's3fs') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
