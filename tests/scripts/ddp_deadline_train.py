"""ddp_train.py on ``slowfile://`` storage (tests/slowfs.py), for the torchrun exit-code test:
each payload write sleeps ``SPOTRUN_TEST_WRITE_DELAY`` seconds, so a stop checkpoint misses
``SPOTRUN_STOP_TIMEOUT`` and every rank exits 143. Same arguments as ddp_train.py."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for slowfs

import slowfs

slowfs.register()
runpy.run_path(str(Path(__file__).with_name("ddp_train.py")), run_name="__main__")
