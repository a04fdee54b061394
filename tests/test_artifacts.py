"""Artifacts: local files and folders kept inside each checkpoint, put back on restore, never
from one checkpoint with the state of another (kill -9 included)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, env_for, wait_for_line

import spotrun
from spotrun.cli import main as cli_main
from spotrun.errors import ConfigError
from spotrun.format.commit import find_latest_valid, list_checkpoints
from spotrun.format.manifest import Manifest
from spotrun.format.snapshot import read_payload
from spotrun.records.layout import checkpoint_dir
from spotrun.storage import Storage

SCRIPT = str(REPO / "tests" / "scripts" / "artifact_train.py")


def _ckpt(url: str, paths, **kw) -> spotrun.Checkpointer:
    kw.setdefault("watchers", [])
    kw.setdefault("handle_signals", False)
    return spotrun.Checkpointer(url, model=torch.nn.Linear(2, 2), artifacts=paths, **kw)


def _write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _tree(root) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            full = os.path.join(folder, f)
            out[os.path.relpath(full, root)] = Path(full).read_text()
    return out


def _train(url, paths, steps, *, at_step, every=2):
    """Steps with ``at_step(s)`` (the artifacts' writer) before each ckpt.step."""
    with _ckpt(url, paths, every_steps=every, values={"s": 0}) as ck:
        start = ck.restore()
        for s in range(start + 1, steps + 1):
            at_step(s)
            ck.values["s"] = s
            ck.step(s)
        ck.wait()


def test_saved_in_the_checkpoint_and_put_back_exactly(tmp_path):
    url, work = str(tmp_path / "run"), tmp_path / "work"
    best, tok, gone = str(work / "best.txt"), str(work / "tok"), str(work / "later.txt")

    def at_step(s):
        _write(best, f"best at {s}")
        _write(os.path.join(tok, "vocab.txt"), f"vocab {s}")
        _write(os.path.join(tok, "sub", "merges.txt"), "merges")

    _train(url, [best, tok, gone], 4, at_step=at_step)
    info = find_latest_valid(Storage(url))
    assert info.step == 4
    assert set(info.manifest.artifacts) == {best, tok, gone}
    assert info.manifest.artifacts[gone] == {"kind": "absent"}
    stored = {n for n in info.manifest.files if n.startswith("artifact-")}
    assert len(stored) == 3  # listed with size and checksum like every payload file
    assert cli_main(["verify", url]) == 0
    # After the checkpoint the script went on (or a crash left newer files behind):
    _write(best, "best at 5, never committed")
    _write(gone, "written after the checkpoint")
    _write(os.path.join(tok, "extra.txt"), "not in the checkpoint")
    os.remove(os.path.join(tok, "vocab.txt"))
    with _ckpt(url, [best, tok, gone], values={"s": 0}) as ck:
        assert ck.restore() == 4 and ck.values["s"] == 4
    assert Path(best).read_text() == "best at 4"
    assert _tree(tok) == {"vocab.txt": "vocab 4", os.path.join("sub", "merges.txt"): "merges"}
    assert not os.path.exists(gone)
    assert not [n for n in os.listdir(work) if "spotrun-restore" in n]


def test_a_fresh_machine_gets_them_back(tmp_path):
    url, work = str(tmp_path / "run"), tmp_path / "work"
    best = str(work / "best.txt")
    _train(url, [best], 2, at_step=lambda s: _write(best, f"best {s}"))
    os.remove(best)
    os.rmdir(work)
    with _ckpt(url, [best]) as ck:
        ck.restore()
    assert Path(best).read_text() == "best 2"


def test_a_damaged_artifact_falls_back_with_its_state(tmp_path, caplog):
    url, best = str(tmp_path / "run"), str(tmp_path / "w" / "best.txt")
    _train(url, [best], 4, at_step=lambda s: _write(best, f"best {s}"), every=2)
    st = Storage(url)
    newest = find_latest_valid(st)
    name = newest.manifest.artifacts[best]["file"]
    path = st.local_path(f"{checkpoint_dir(4)}/{name}")
    data = bytearray(Path(path).read_bytes())
    data[-1] ^= 1  # same size, other bytes: only the checksum can tell
    Path(path).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="spotrun"), \
            _ckpt(url, [best], values={"s": 0}) as ck:
        assert ck.restore() == 2 and ck.values["s"] == 2
    assert Path(best).read_text() == "best 2"
    assert any("damaged" in r.getMessage() for r in caplog.records)


def test_checkpoints_without_artifacts_still_load(tmp_path, caplog):
    url, best = str(tmp_path / "run"), str(tmp_path / "best.txt")
    with _ckpt(url, None, every_steps=1) as ck:  # an older run: no artifacts
        for _ in ck.range(2):
            pass
    raw = Storage(url).read_bytes(f"{checkpoint_dir(2)}/manifest.json")
    assert "artifacts" not in json.loads(raw)  # the format is unchanged without them
    assert Manifest.from_json(raw, where="x").artifacts == {}
    _write(best, "local")
    with caplog.at_level(logging.WARNING, logger="spotrun"), _ckpt(url, [best]) as ck:
        assert ck.restore() == 2
    assert Path(best).read_text() == "local"  # not in that checkpoint: left alone, with a warning
    assert any("not in the checkpoint" in r.getMessage() for r in caplog.records)


def test_bad_artifact_lists_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="twice"):
        _ckpt(str(tmp_path / "r"), ["a/b", "a/./b"])
    with pytest.raises(ConfigError, match="inside"):
        _ckpt(str(tmp_path / "r"), ["a", "a/b"])


def _check_every_commit(url: str) -> int:
    """Each committed checkpoint's stored artifacts belong to its own step, as its state does."""
    st = Storage(url)
    committed = [i for i in list_checkpoints(st) if i.status == "committed"]
    for info in committed:
        m, folder = info.manifest, checkpoint_dir(info.step)
        payload = read_payload(st, info.step, "rank-00000.pt", m.files["rank-00000.pt"])
        assert payload["values"]["step"] == info.step
        assert payload["objects"]["model"]["weight"].eq(info.step).all()
        blob = next(e for p, e in m.artifacts.items() if p.endswith("blob.bin"))
        assert int(bytes(st.read_bytes(f"{folder}/{blob['file']}"))[:8]) == info.step
        out = next(e for p, e in m.artifacts.items() if p.endswith("out"))
        metrics = json.loads(bytes(st.read_bytes(f"{folder}/{out['files']['metrics.json']}")))
        assert metrics["step"] == info.step
        assert ("odd.txt" in out["files"]) == bool(info.step % 2)
    return len(committed)


def _check_restored(line: str) -> int:
    """What the restarted process found right after its restore matches the restored step."""
    seen = json.loads(line.split("restored ", 1)[1])
    s = seen["step"]
    if s:
        assert seen["values_step"] == s
        assert seen["blob"] == s and seen["blob_size"] == 8 + (4 << 20), seen
        assert seen["metrics"] == s and seen["odd"] == bool(s % 2), seen
        assert sorted(seen["files"]) == sorted(["metrics.json"] + (["odd.txt"] if s % 2 else [])), seen
        assert seen["maybe"] == (str(s) if s % 3 == 0 else None), seen
    return s


@pytest.mark.slow
def test_kill9_during_saves_never_pairs_one_checkpoints_artifacts_with_anothers_state(tmp_path, warm_python):
    url, work = str(tmp_path / "run"), tmp_path / "work"
    work.mkdir()
    rng = random.Random(7)
    restored = []
    # Each start a fork of one interpreter that imported torch (``warm_python``,
    # tests/warmfork.py): a real process SIGKILLed mid-save, without a torch import per start.
    for _ in range(4):
        proc = warm_python.spawn([SCRIPT, str(work), "100000"], env_for(url))
        restored.append(_check_restored(wait_for_line(proc, "restored ", timeout=120)))
        # Every step saves 4 MiB of artifacts; kills land in the capture, the write, the
        # commit or between them.
        wait_for_line(proc, f"step {restored[-1] + 3}", timeout=120)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert _check_every_commit(url) >= 1
    proc = warm_python.spawn([SCRIPT, str(work), "0"], env_for(url))
    restored.append(_check_restored(wait_for_line(proc, "restored ", timeout=120)))
    proc.kill()
    proc.wait(timeout=30)
    assert all(s > 0 for s in restored[1:]) and restored == sorted(restored), restored
    assert cli_main(["verify", url]) == 0
