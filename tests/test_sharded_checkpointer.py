"""FSDP2 under real torchrun (gloo, CPU) with the Checkpointer: sharded saves through DCP,
bit-exact resume after SIGTERM on the same world size, and elastic resume on another one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import pytest
import torch
from helpers import (
    RANK_AT_START,
    REPO,
    WARMFORK,
    committed_steps,
    env_for,
    finish_session,
    free_port,
    torchrun,
)
from warmfork import WarmExec

from spotrun.cli import main
from spotrun.format.commit import list_checkpoints, read_manifest, verify_checkpoint
from spotrun.notices.fake_server import FakeMetadataServer
from spotrun.records.layout import EXIT_FINISHED, EXIT_INTERRUPTED, checkpoint_dir
from spotrun.storage import Storage

pytestmark = pytest.mark.slow

SCRIPT = str(REPO / "tests" / "scripts" / "fsdp_train.py")
STEPS, EVERY, SAMPLES = 40, 8, 240
TIMEOUT = 300


def _launch(url: str, nproc: int, *extra: str, warm: WarmExec, env: dict[str, str] | None = None,
            **more: str) -> subprocess.Popen:
    """torchrun of the script, its ranks forks of ``warm`` (the ``warm_ranks`` fixture)."""
    return torchrun(SCRIPT, nproc, "--url", url, "--steps", str(STEPS), "--every-steps", str(EVERY),
                    "--samples", str(SAMPLES), *extra, env=env or env_for(url, **more), warm=warm)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    return finish_session(proc, TIMEOUT)


def _digest(out: str) -> str:
    found = re.findall(r"^full-state ([0-9a-f]{64})$", out, re.MULTILINE)
    assert len(found) == 1, out[-4000:]
    return found[0]


def _restore_steps(out: str) -> dict[int, int]:
    """rank -> the optimizer steps its restore ran (the script counts them)."""
    return {int(r): int(n) for r, n in
            re.findall(r"^rank (\d) restore ran (\d+) optimizer steps$", out, re.MULTILINE)}


def _per_epoch(out: str) -> dict[int, Counter]:
    epochs: dict[int, Counter] = {}
    for _, _, e, idx in re.findall(r"^rank (\d) step (\d+) epoch (\d+) idx ([\d,]+)$", out,
                                   re.MULTILINE):
        epochs.setdefault(int(e), Counter()).update(int(i) for i in idx.split(","))
    return epochs


def _interrupt(url: str, nproc: int, *extra: str, warm: WarmExec, after: int = 0, **more: str) -> tuple[int, str]:
    """Run on ``nproc`` ranks and SIGTERM the wrapper just after its first checkpoint past
    step ``after`` (the one it resumed from)."""
    proc = _launch(url, nproc, "--step-sleep", "0.05", *extra, warm=warm, **more)
    deadline = time.monotonic() + TIMEOUT
    while max(committed_steps(url), default=0) <= after:
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} early:\n{proc.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, "no checkpoint committed"
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert code == EXIT_INTERRUPTED, out[-4000:]
    stops = set(re.findall(rf"^rank \d exit {EXIT_INTERRUPTED} at step (\d+)$", out, re.MULTILINE))
    assert len(stops) == 1, out[-4000:]
    stop = int(stops.pop())
    assert after < stop < STEPS and max(committed_steps(url)) == stop
    if after:
        assert f"resumed from step {after}" in out, out[-4000:]
    return stop, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, warm_ranks) -> tuple[str, str]:
    url = str(tmp_path_factory.mktemp("fsdp") / "reference")
    code, out = _finish(_launch(url, 2, warm=warm_ranks))
    assert code == EXIT_FINISHED, out[-4000:]
    return _digest(out), out


@pytest.mark.parametrize("before,after", [(2, 3), (3, 2)])
def test_resume_on_another_world_size(tmp_path, warm_ranks, before, after):
    url = str(tmp_path / "run")
    dump = tmp_path / "dump"
    dump.mkdir()
    stop, first = _interrupt(url, before, "--dump", str(dump), warm=warm_ranks)
    code, out = _finish(_launch(url, after, "--dump", str(dump), warm=warm_ranks))
    assert code == EXIT_FINISHED, out[-4000:]
    assert f"resumed from step {stop}" in out
    # The fresh AdamW's state came from the checkpoint's index (spotrun.format.optim_init),
    # not from torch's zero-gradient optimizer step, on every rank of the new world size.
    assert _restore_steps(out) == dict.fromkeys(range(after), 0), out[-4000:]
    saved = torch.load(dump / f"stopped-{stop}.pt", weights_only=True)
    loaded = torch.load(dump / f"restored-{stop}.pt", weights_only=True)
    flat_saved, flat_loaded = _flatten(saved), _flatten(loaded)
    assert flat_saved.keys() == flat_loaded.keys()
    for key, value in flat_saved.items():
        other = flat_loaded[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        else:
            assert value == other, key
    # Every finished epoch read every sample once; only the remainder rule (the last
    # shares padded to a multiple of the world size) may repeat fewer than `after` of them.
    epochs = _per_epoch(first + out)
    for epoch in sorted(epochs)[:-1]:  # the last one is cut short by --steps
        seen = epochs[epoch]
        assert set(seen) == set(range(SAMPLES)), epoch
        assert sum(seen.values()) - SAMPLES < after, (epoch, seen.most_common(3))


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: tree}


def test_kill_9_of_one_rank_during_a_save_leaves_the_previous_checkpoint(tmp_path, reference, warm_ranks):
    """A rank killed while the ranks write a sharded checkpoint: that one never commits, the
    previous one stays the latest and verifies, and a relaunch resumes from it bit-exactly."""
    digest, _ = reference
    path = tmp_path / "run"
    url = f"slowfile://{path}"
    env = env_for(url)
    env["SPOTRUN_TEST_WRITE_DELAY"] = "0.3"  # every write call: saves take seconds
    proc = _launch(url, 2, env=env, warm=warm_ranks)
    lines: list[str] = []
    pids: dict[int, int] = {}
    while len(pids) < 2:
        line = proc.stdout.readline()
        assert line, "".join(lines)[-4000:]
        lines.append(line)
        m = re.match(r"rank (\d) pid (\d+)$", line.strip())
        if m:
            pids[int(m.group(1))] = int(m.group(2))
    st = Storage(str(path))
    deadline = time.monotonic() + TIMEOUT
    while True:  # the first checkpoint committed, the second one being written
        infos = list_checkpoints(st)
        committed = [i.step for i in infos if i.status == "committed"]
        writing = [i.step for i in infos if i.status == "incomplete"]
        if committed and writing and max(writing) > max(committed):
            break
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
        time.sleep(0.02)
    os.kill(pids[1], signal.SIGKILL)
    code, out = _finish(proc)
    assert code not in (EXIT_FINISHED, EXIT_INTERRUPTED), out[-4000:]
    last = max(committed)
    assert max(committed_steps(str(path))) == last
    assert verify_checkpoint(st, read_manifest(st, last)) == []
    code, out = _finish(_launch(str(path), 2, warm=warm_ranks))
    assert code == EXIT_FINISHED, out[-4000:]
    assert f"resumed from step {last}" in out
    assert _digest(out) == digest


def test_check_resume_passes_under_the_wrapper(tmp_path, capfd, monkeypatch, warm_ranks):
    """`spotrun check-resume` on an FSDP2 script under `python -m spotrun.distributed`:
    real SIGTERMs to the wrapper, and the sharded state compared whole."""
    # One interruption keeps this torchrun test short; test_resume.py covers several.
    # check-resume through the CLI's entry point in this process (as test_resume.py's): its
    # runs are real torchruns; a process for the CLI itself only imported torch once more.
    # Its ranks are forks of ``warm_ranks`` (each run's wrapper a process of its own).
    for k, v in {**env_for(""), **RANK_AT_START}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)
    capfd.readouterr()
    code = main(["check-resume", "-k", "1", "--seed", "5", "--timeout", str(TIMEOUT),
                 "--workdir", str(tmp_path / "cr"), "--",
                 sys.executable, "-m", "spotrun.distributed", "--nproc-per-node", "2",
                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), WARMFORK, warm_ranks.socket, SCRIPT,
                 "--steps", str(STEPS), "--every-steps", str(EVERY), "--samples", str(SAMPLES),
                 "--step-sleep", "0.1"])
    out, err = capfd.readouterr()
    assert code == 0, (out + err)[-4000:]
    assert "PASS" in out
    assert "1 of 1 interruptions delivered" in out, out


def test_notice_to_one_rank_then_sigterm_then_resume_is_bit_exact(tmp_path, reference, warm_ranks):
    """One run, three launches (each FSDP start costs seconds of a loaded box):

    1. rank 1 alone sees a spot notice; the agreement stops both at one step and the sharded
       stop checkpoint commits;
    2. resumed from it, SIGTERM to the wrapper: both stop at one step again; every rank's
       shards, DCP's index and the rank files are listed in the manifest and verify;
    3. the finish ends bit-for-bit as the uninterrupted run, and across the three launches
       every epoch read the samples the uninterrupted run read.

    The three launches share one node-local copy (``SPOTRUN_LOCAL_DIR``), the same machine
    restarting: before the finish every file of the run URL's stop checkpoint but the
    manifest is damaged, so resuming from it proves that the shards, DCP's index and the
    rank files all came from the local copy (a read of the run URL finds the damage and
    falls back to an older step)."""
    digest, ref_out = reference
    url = str(tmp_path / "run")
    # Where a user's copy goes by default (memory): a local copy never takes the last
    # quarter of a device, and the disk under tmp_path may be fuller than that.
    shm = tempfile.mkdtemp(prefix="spotrun-test-", dir="/dev/shm") if os.path.isdir("/dev/shm") \
        else str(tmp_path / "local")
    try:
        _notice_sigterm_resume(url, {"SPOTRUN_LOCAL_DIR": shm}, digest, ref_out, warm_ranks)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def _notice_sigterm_resume(url: str, local: dict[str, str], digest: str, ref_out: str, warm: WarmExec) -> None:
    with FakeMetadataServer("ec2") as imds:
        proc = _launch(url, 2, "--step-sleep", "0.05", warm=warm, SPOTRUN_TEST_IMDS_RANK1=imds.url,
                       SPOTRUN_POLL_INTERVAL="0.1", SPOTRUN_NOTICE_SOURCE="none", **local)
        deadline = time.monotonic() + TIMEOUT
        while not committed_steps(url):
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            time.sleep(0.05)
        imds.post_interruption("terminate", in_seconds=120)
        code, first = _finish(proc)
    assert code == EXIT_INTERRUPTED, first[-4000:]
    assert re.search(r"rank1 spotrun[\w.]* ec2 notice 'terminate'", first)
    assert not re.search(r"rank0 spotrun[\w.]* ec2 notice", first)
    stops = set(re.findall(rf"^rank \d exit {EXIT_INTERRUPTED} at step (\d+)$", first, re.MULTILINE))
    assert len(stops) == 1, first[-4000:]
    stop = int(stops.pop())
    assert max(committed_steps(url)) == stop
    assert re.search(r"rank1 spotrun[\w.]* stop after notice: posted \d\d:\d\d:\d\d", first), first[-4000:]

    stop, second = _interrupt(url, 2, warm=warm, after=stop, **local)
    st = Storage(url)
    manifest = read_manifest(st, stop)
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rank-00000.pt",
            "rank-00001.pt"} <= set(manifest.files)
    assert manifest.world_size == 2 and verify_checkpoint(st, manifest) == []

    for name in manifest.files:  # the run URL's copy damaged, sizes kept
        path = os.path.join(url, checkpoint_dir(stop), name)
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            data[len(data) // 2] ^= 0x01
            f.seek(0)
            f.write(data)
    assert verify_checkpoint(st, manifest) != []
    code, out = _finish(_launch(url, 2, warm=warm, **local))
    assert code == EXIT_FINISHED, out[-4000:]
    resumed = re.findall(rf"rank(\d) \S+ resumed from step {stop} .*$", out, re.MULTILINE)
    assert len(resumed) == 2, out[-4000:]
    assert "from the run URL" not in out or all(
        "0 B from the run URL" in line for line in re.findall(r"resumed from step .*$", out, re.MULTILINE))
    assert _digest(out) == digest
    assert _per_epoch(first + second + out) == _per_epoch(ref_out)
