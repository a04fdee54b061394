"""The local simulator's machines (issue 22 item 3): each has its own node-local directory,
``SPOTRUN_LOCAL_DIR=<base>/<machine id>``, gone with the machine; ``--recovery`` options."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from spotrun.errors import ConfigError
from spotrun.launch.local import LocalLauncher, LocalOptions
from spotrun.launch.local_nodes import local_dir_base
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

# Each "machine" notes its directory and what else is in the base; the first stops itself
# as on a notice (75), the second finishes.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    url, seg, mine = os.environ["SPOTRUN_URL"], os.environ["SPOTRUN_SEGMENT_ID"], os.environ["SPOTRUN_LOCAL_DIR"]
    os.makedirs(mine, exist_ok=True)
    open(os.path.join(mine, "copy.bin"), "wb").write(b"x")
    with open(os.path.join(url, "seen-" + seg + ".json"), "w") as f:
        json.dump({"dir": mine, "base": sorted(os.listdir(os.path.dirname(mine)))}, f)
    if seg == "sim-1":
        sys.exit(75)
    open(os.path.join(url, "done.json"), "w").write("{}")
    """
)


def test_each_machine_has_its_own_local_dir_deleted_with_it(tmp_path: Path) -> None:
    run, base = tmp_path / "run", tmp_path / "shm"
    script = tmp_path / "machine.py"
    script.write_text(SCRIPT)
    opts = LocalOptions(run_url=str(run), command=[sys.executable, str(script)], interruptions=0,
                        env={"SPOTRUN_LOCAL_DIR": str(base)}, poll_s=0.05)
    outcome = LocalLauncher(Storage(str(run)), opts, echo=None).run()
    assert outcome.status == "finished", outcome
    first = json.loads((run / "seen-sim-1.json").read_text())
    second = json.loads((run / "seen-sim-2.json").read_text())
    assert first == {"dir": str(base / "sim-1"), "base": ["sim-1"]}
    # The first machine's memory went with it: the second never sees its copy.
    assert second == {"dir": str(base / "sim-2"), "base": ["sim-2"]}
    assert list(base.iterdir()) == []  # and the last one's at the end
    # Stopping on its own (no notice, no loss the simulator played) is no loss: no recovery record.
    assert not [r for r in Ledger(Storage(str(run))).records() if r["event"] == "recovery_started"]


@pytest.mark.parametrize(("env", "expected"), [
    ({"SPOTRUN_LOCAL_DIR": "off"}, None),
    ({"SPOTRUN_LOCAL_DIR": "OFF "}, None),
    ({"SPOTRUN_LOCAL_DIR": "/fast/nvme"}, "/fast/nvme"),
])
def test_local_dir_base(env: dict, expected: str | None) -> None:
    assert local_dir_base(env) == expected


def test_local_dir_base_default_is_memory_where_there_is_some() -> None:
    got = local_dir_base({})
    assert got == ("/dev/shm/spotrun" if Path("/dev/shm").is_dir() else None)


@pytest.mark.parametrize(("kw", "words"), [
    ({"recovery": "spare"}, "--recovery 'spare': use replace or relaunch"),
    ({"rejoin_timeout_s": float("nan")}, "rejoin_timeout_s nan"),
])
def test_bad_recovery_options_are_refused(kw: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        LocalOptions(run_url="r", command=["x"], nodes=2, **kw).validate()
