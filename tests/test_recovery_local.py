"""The node-local copy of the newest checkpoint: used only when it matches the committed
manifest byte for byte; never costs a save."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import committed_steps, env_for, ledger_events
from warmfork import WarmPython

from spotrun.format.commit import commit, read_manifest
from spotrun.format.manifest import Manifest
from spotrun.format.snapshot import read_payload, write_payload
from spotrun.records.layout import checkpoint_dir
from spotrun.recovery.local import LocalCopy
from spotrun.storage import Storage


def _save(copy: LocalCopy, run: Storage, step: int, payload: dict, *, expected: int | None = None) -> Manifest:
    """What a save does: begin the copy, write through the tee, commit at the run URL, seal."""
    copy.begin(step, expected)
    name, entry = write_payload(copy.storage(run), step, 0, payload)
    manifest = Manifest(step=step, files={name: entry})
    commit(run, manifest)
    copy.seal(step)
    return manifest


def _from_local(copy: LocalCopy, run: Storage, manifest: Manifest) -> bool:
    """Whether a restore of ``manifest`` reads every byte from the local copy (none from the URL)."""
    reader = copy.reader(run, manifest)
    for name in manifest.files:
        reader.read_bytes(f"{checkpoint_dir(manifest.step)}/{name}")
    return reader.url_bytes == 0 and reader.local_bytes == manifest.total_bytes


@pytest.fixture
def run(tmp_path):
    return Storage(str(tmp_path / "run"))


@pytest.fixture
def copy(tmp_path, run):
    return LocalCopy(tmp_path / "local", run.display())


def test_a_sealed_copy_restores_the_committed_bytes_and_only_the_newest_is_kept(copy, run):
    first = _save(copy, run, 10, {"w": torch.arange(1000.0)})
    assert _from_local(copy, run, first)
    second = _save(copy, run, 20, {"w": torch.arange(1000.0) * 2})
    reader = copy.reader(run, read_manifest(run, 20))
    (name, entry), = second.files.items()
    assert torch.equal(read_payload(reader, 20, name, entry)["w"], torch.arange(1000.0) * 2)
    assert (reader.local_bytes, reader.url_bytes) == (entry.size, 0)
    # Bounded to the newest: step 10's copy went once 20 was sealed; 10 is read from the URL.
    assert sorted(p.name for p in copy.root.iterdir() if p.is_dir()) == [checkpoint_dir(20)]
    assert not _from_local(copy, run, first)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "other_bytes"])
def test_a_copy_that_does_not_match_the_manifest_is_ignored(copy, run, damage, caplog):
    _save(copy, run, 5, {"w": torch.ones(4096)})
    path = copy.root / checkpoint_dir(5) / "rank-00000.pt"
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "missing":
        path.unlink()
    else:  # a copy another writer left for the same step: other state, same step number
        other = LocalCopy(copy.directory, copy.run_url)
        other.begin(5)
        write_payload(other.storage(Storage(str(copy.directory / "elsewhere"))), 5, 0, {"w": torch.zeros(4096)})
        other.seal(5)
    with caplog.at_level(logging.INFO, logger="spotrun"):
        assert not _from_local(copy, run, read_manifest(run, 5))
    assert ("not used" in caplog.text or "no local copy" in caplog.text) and "reading the run URL" in caplog.text


def test_another_runs_copy_and_an_older_step_are_never_used(tmp_path, copy, run, caplog):
    _save(copy, run, 7, {"w": torch.ones(16)})
    other_run = Storage(str(tmp_path / "other-run"))
    other = LocalCopy(copy.directory, other_run.display())
    other_manifest = _save(other, other_run, 7, {"w": torch.ones(16)})
    assert other.root != copy.root
    newer = _save(LocalCopy(tmp_path / "elsewhere", run.display()), run, 9, {"w": torch.ones(16)})
    with caplog.at_level(logging.INFO, logger="spotrun"):
        assert not _from_local(copy, run, newer)  # this node holds step 7 only
    assert "holds step 7" in caplog.text
    assert _from_local(other, other_run, other_manifest)


def test_no_room_skips_the_copy_and_the_save_still_commits(copy, run, caplog):
    with caplog.at_level(logging.WARNING, logger="spotrun"):
        manifest = _save(copy, run, 3, {"w": torch.ones(8)}, expected=1 << 60)
    assert "no local copy of step 3" in caplog.text
    assert read_manifest(run, 3).files == manifest.files
    assert not _from_local(copy, run, manifest)


def _tmpfs(path) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_tmpfs_drops_the_copy_never_the_save(tmp_path, run, caplog):
    shm = tmp_path / "shm"
    if not _tmpfs(shm):
        pytest.skip("needs root to mount a 1 MiB tmpfs")
    try:
        copy = LocalCopy(shm, run.display())
        state = {"w": torch.arange(1 << 19, dtype=torch.float32)}  # 2 MiB: more than the tmpfs
        with caplog.at_level(logging.WARNING, logger="spotrun"):
            manifest = _save(copy, run, 4, state)
        assert "local copy of step 4 dropped" in caplog.text
        (name, entry), = read_manifest(run, 4).files.items()
        assert torch.equal(read_payload(run, 4, name, entry)["w"], state["w"])
        assert not _from_local(copy, run, manifest)
        assert not [p for p in copy.root.iterdir() if p.is_dir()]  # nothing half-written kept
    finally:
        subprocess.run(["umount", str(shm)], check=False)


def test_kill_9_while_the_copy_is_written_leaves_nothing_a_restore_uses(tmp_path, run, warm_python):
    local = tmp_path / "local"
    script = textwrap.dedent(f"""
        import sys, torch
        from spotrun.recovery.local import LocalCopy
        from spotrun.format.snapshot import write_payload
        from spotrun.storage import Storage
        run = Storage({str(tmp_path / 'run')!r})
        copy = LocalCopy({str(local)!r}, run.display())
        copy.begin(8)
        big = {{"w": torch.ones(1 << 22)}}
        print("writing", flush=True)
        while True:  # rewrite the same file until killed, mid-write most likely
            write_payload(copy.storage(run), 8, 0, big)
    """)
    # A fork of the warm interpreter (tests/warmfork.py): a real process, SIGKILLed for real.
    (tmp_path / "writer.py").write_text(script)
    proc = warm_python.spawn([str(tmp_path / "writer.py")])
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    copy = LocalCopy(local, run.display())
    partials = [p for p in copy.root.iterdir() if p.name.startswith(".partial-")]
    assert partials  # the killed writer's half copy is there...
    manifest = _save(copy, run, 8, {"w": torch.zeros(16)})
    assert _from_local(copy, run, manifest)  # ...never used for the committed step 8,
    # and gone once a newer step is sealed (until then it may be another rank's, still writing)
    _save(copy, run, 9, {"w": torch.zeros(16)})
    assert not [p for p in copy.root.iterdir() if p.name.startswith(".partial-")]


def test_from_env_default_and_off(monkeypatch, tmp_path):
    monkeypatch.setenv("SPOTRUN_LOCAL_DIR", "off")
    assert LocalCopy.from_env("file:///x") is None
    monkeypatch.setenv("SPOTRUN_LOCAL_DIR", str(tmp_path / "d"))
    assert LocalCopy.from_env("file:///x").directory == tmp_path / "d"
    monkeypatch.delenv("SPOTRUN_LOCAL_DIR")
    default = LocalCopy.from_env("file:///x")
    assert default is None or str(default.directory) == "/dev/shm/spotrun"


# -- through a real training process -------------------------------------------------------------

SCRIPT = str(Path(__file__).parent / "scripts" / "local_copy_train.py")


def _interrupted_run(warm: WarmPython, url: str, local: Path) -> int:
    """Train, SIGTERM at step 12: the stop checkpoint is committed; its step."""
    out = _run(warm, url, local, "30", "12", code=75)
    assert "checkpoint at step" in out
    return max(committed_steps(url))


def _run(warm: WarmPython, url: str, local: Path | str, *args: str, code: int = 0) -> str:
    # Each run a fork of the warm interpreter (tests/warmfork.py; no torch import per run):
    # all of them, the uninterrupted reference too, so the bit-for-bit comparison is between
    # processes started alike.
    proc = warm.spawn([SCRIPT, *args], env_for(url, SPOTRUN_LOCAL_DIR=str(local)))
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == code, out[-4000:]
    return out


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, warm_python):
    base = tmp_path_factory.mktemp("uninterrupted")
    out = _run(warm_python, str(base / "run"), "off", "30")
    return next(line for line in out.splitlines() if line.startswith("final "))


def test_a_restart_on_the_same_machine_reads_no_checkpoint_bytes_from_the_run_url(tmp_path, uninterrupted,
                                                                                  warm_python):
    url, local = str(tmp_path / "run"), tmp_path / "local"
    step = _interrupted_run(warm_python, url, local)
    total = read_manifest(Storage(url), step).total_bytes  # retention removes it later
    # Damage the run URL's copy: a restore that read it would find the damage and fall back.
    _flip(Path(url) / checkpoint_dir(step) / "rank-00000.pt")
    out = _run(warm_python, url, local, "30")
    resumed = next(line for line in out.splitlines() if "resumed from step" in line)
    assert f"resumed from step {step} " in resumed and "0 B from the run URL" in resumed, resumed
    assert "from this machine's copy" in resumed and not resumed.split("; ")[-1].startswith("0 B"), resumed
    assert uninterrupted in out  # the same run: bit for bit the uninterrupted weights
    _assert_restore_recorded(url, step, total, local=True)


def test_a_damaged_local_copy_is_ignored_and_the_run_url_is_read(tmp_path, uninterrupted, warm_python):
    url, local = str(tmp_path / "run"), tmp_path / "local"
    step = _interrupted_run(warm_python, url, local)
    total = read_manifest(Storage(url), step).total_bytes
    (copy_dir,) = [p for p in local.iterdir() if p.is_dir()]
    _flip(copy_dir / checkpoint_dir(step) / "rank-00000.pt")
    out = _run(warm_python, url, local, "30")
    assert "local copy of" in out and "not used" in out, out[-3000:]
    resumed = next(line for line in out.splitlines() if "resumed from step" in line)
    assert f"resumed from step {step} " in resumed and "0 B from this machine's copy" in resumed, resumed
    assert uninterrupted in out
    _assert_restore_recorded(url, step, total, local=False)


def _assert_restore_recorded(url: str, step: int, total: int, *, local: bool) -> None:
    """The resumed segment's ``training_resumed`` says what its restore cost: when it began,
    how long it took, and the checkpoint's bytes by source (the cost report's recovery)."""
    resumed = ledger_events(url, "training_resumed")[-1]
    assert resumed["step"] == step
    expected = {"bytes_local": total if local else 0, "bytes_peer": 0, "bytes_url": 0 if local else total}
    assert {k: resumed.get(k) for k in expected} == expected, resumed
    assert resumed["process_started_at"] <= resumed["restore_started_at"] <= resumed["first_step_at"], resumed
    assert 0 < resumed["restore_s"] <= resumed["first_step_at"] - resumed["restore_started_at"], resumed


# Rank 1 learns only that its files were gathered for the commit, not that rank 0 wrote the
# manifest: it keeps its older copy until a later collective proves the commit happened. It
# used to drop it at the gather, and when rank 0's node died between the gather and the
# manifest (seen in the benchmark: DDP, 1 of 8 runs), rank 1 restored the older, committed step
# and read its own file of it from the run URL. Two real gloo ranks through the Checkpointer,
# each with its own local directory (two machines); rank 0 is killed -9 at the commit of
# step 4, before its manifest.
_GATHERED = textwrap.dedent("""
    import os, signal, sys, time
    import torch, torch.distributed as dist
    import spotrun
    from spotrun.checkpoint import saver as saver_mod

    rank, mode = int(os.environ["RANK"]), sys.argv[1]
    real_commit = saver_mod.commit
    def commit(storage, manifest):
        if manifest.step == 4 and mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # the machine goes before the manifest
        real_commit(storage, manifest)
    saver_mod.commit = commit
    dist.init_process_group("gloo")
    model = torch.nn.Linear(32, 32)
    try:
        with spotrun.Checkpointer(model=model, per_rank={"own": torch.nn.Linear(8, 8)},
                                  every_steps=2) as ckpt:
            for step in ckpt.range(100 if mode == "kill" else 6):
                dist.all_reduce(torch.ones(1))
                print(f"rank {rank} step {step + 1}", flush=True)
                time.sleep(0.05)
    except Exception as exc:  # the other rank vanished
        print(f"rank {rank} failed: {type(exc).__name__}", flush=True)
        os._exit(1)
""")


def _two_machines(tmp_path: Path, run: Storage, mode: str) -> tuple[list[subprocess.Popen], list[str]]:
    from helpers import free_port

    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = env_for(run.display(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, SPOTRUN_LOCAL_DIR=str(tmp_path / f"machine{rank}"),
                      SPOTRUN_NOTICE_SOURCE="none", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([os.sys.executable, "-c", _GATHERED, mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, outs


@pytest.mark.slow
def test_a_rank_keeps_its_older_copy_until_the_commit_it_was_gathered_for_is_proven(tmp_path, run):
    procs, outs = _two_machines(tmp_path, run, "kill")
    assert procs[0].returncode == -signal.SIGKILL, outs[0][-3000:]
    assert procs[1].returncode == 1, outs[1][-3000:]
    assert committed_steps(run.display()) == [2]  # step 4 was gathered, never committed
    manifest = read_manifest(run, 2)
    machine1 = LocalCopy(tmp_path / "machine1", run.display())
    reader = machine1.reader(run, manifest)
    own = "rank-00001.pt"
    data = reader.read_bytes(f"{checkpoint_dir(2)}/{own}")
    assert data == (Path(run.display()) / checkpoint_dir(2) / own).read_bytes()
    assert reader.bytes_by_source() == {"local": manifest.files[own].size, "peer": 0, "url": 0}, outs[1][-2000:]


@pytest.mark.slow
def test_once_the_commit_is_proven_the_older_copy_goes(tmp_path, run):
    """The other side of the rule above: only the newest committed copy stays on a machine."""
    procs, outs = _two_machines(tmp_path, run, "finish")
    assert [p.returncode for p in procs] == [0, 0], outs[1][-3000:]
    for machine in ("machine0", "machine1"):
        root = LocalCopy(tmp_path / machine, run.display()).root
        assert sorted(c.name for c in root.iterdir() if c.name.isdigit()) == [checkpoint_dir(6)], machine
