"""A real full disk (a 2 MiB tmpfs; needs root): a failed write leaves no temporary behind,
a failed save leaves the last committed checkpoint the latest and restorable."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import spotrun
from spotrun.errors import SaveError, StorageError
from spotrun.format.commit import find_latest_valid
from spotrun.storage import Storage


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path) -> None:
    """Write until the disk is full (ENOSPC), leaving the filler file in place."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def _temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name]


def test_create_if_absent_on_a_full_disk_leaves_no_temporary(tiny_disk: Path) -> None:
    st = Storage(str(tiny_disk / "run"))
    st.ensure_root(create=True)
    assert st.write_if_absent("ledger/a.json", b"{}")
    _fill(tiny_disk)
    with pytest.raises(StorageError):
        st.write_if_absent("ledger/b.json", b"x" * 200_000)
    assert _temporaries(tiny_disk) == []
    assert not st.exists("ledger/b.json")


def test_save_on_a_full_disk_keeps_the_last_checkpoint(tiny_disk: Path) -> None:
    url = str(tiny_disk / "run")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)  # ~17 KB of weights: fits before the disk fills
    with spotrun.Checkpointer(url, model=model, every_steps=10**9, async_save=False,
                              watchers=[], handle_signals=False) as ck:
        ck.restore()
        ck.steps_done = 1
        ck.save()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.weight.add_(1.0)
        _fill(tiny_disk)
        ck.steps_done = 2
        with pytest.raises(SaveError, match="previous checkpoint is intact"):
            ck.save()
        os.unlink(tiny_disk / "filler")
    info = find_latest_valid(Storage(url))
    assert info is not None and info.step == 1
    assert [p for p in _temporaries(tiny_disk) if "/ledger/" not in p] == []
    fresh = torch.nn.Linear(64, 64)
    with spotrun.Checkpointer(url, model=fresh, watchers=[], handle_signals=False) as ck:
        assert ck.restore() == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k
