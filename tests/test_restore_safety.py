"""Restore skips only proven damage, never overwrites it, and refuses state it could not load.

Issue 9 items 1, 3, 4 and 5: a checkpoint copied over another (folder, manifest or payload
naming another step) is damage; a read that fails for any other reason (403, a dropped
connection) fails the start and changes nothing; a run whose checkpoints are all damaged
refuses to start unless told to, and even then moves them aside instead of overwriting
them; state that ``weights_only`` loading would refuse is refused at save time.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from helpers import EXAMPLE, REPO, env_for

import spotrun
from spotrun.cli import main as cli_main
from spotrun.errors import (
    AllCheckpointsDamagedError,
    CheckpointUnreadableError,
    ConfigError,
    UnloadableStateError,
)
from spotrun.format.commit import DAMAGED_DIR, list_checkpoints, prune
from spotrun.format.snapshot import check_loadable, check_plain
from spotrun.records.layout import EXIT_FINISHED, MANIFEST, checkpoint_dir, parse_step
from spotrun.storage import Storage

# -- helpers -----------------------------------------------------------------------------

_Pt = collections.namedtuple("_Pt", "x")


def _ck(url: str, **kw) -> spotrun.Checkpointer:
    return spotrun.Checkpointer(url, handle_signals=False, watchers=[], async_save=False, **kw)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def _make_run(url: str, steps: tuple[int, ...] = (5, 10, 15), **kw) -> dict[int, dict]:
    """Checkpoints at ``steps``, each with distinct weights; returns the weights by step."""
    model = _model()
    states = {}
    with _ck(url, model=model, every_steps=5, keep_last=10, **kw) as ck:
        assert ck.restore() == 0
        for step in range(1, max(steps) + 1):
            with torch.no_grad():
                model.weight.add_(1.0)
            ck.step(step)
            if step in steps:
                states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    assert [c.step for c in list_checkpoints(Storage(url))] == list(steps)
    return states


def _restore(url: str, **kw) -> tuple[int, torch.nn.Module]:
    model = _model(seed=99)
    with _ck(url, model=model, **kw) as ck:
        return ck.restore(), model


def _same(model: torch.nn.Module, state: dict) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _snapshot(root: str) -> dict[str, str]:
    """Every file of the checkpoint folders (and damaged/, done.json), hashed.

    The ledger and any other bookkeeping a start writes are left out: the promise is about
    checkpoints.
    """
    out = {}
    for dirpath, _, files in os.walk(root):
        top = os.path.relpath(dirpath, root).split(os.sep)[0]
        for f in files:
            if top == "." and f != "done.json":
                continue
            if top != "." and parse_step(top) is None and top != DAMAGED_DIR:
                continue
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _flip_byte(st: Storage, step: int, state: dict) -> None:
    """Damage a payload so that it keeps its size and still unpickles (a bit flip in tensor
    data): only the checksum, checked before the state loads, can tell."""
    rel = f"{checkpoint_dir(step)}/rank-00000.pt"
    data = bytearray(st.read_bytes(rel))
    i = data.find(state["weight"].numpy().tobytes())  # torch.save stores tensors uncompressed
    assert i > 0
    data[i + 1] ^= 0x40
    st.write_bytes(rel, bytes(data))


def _copy_folder(root: str, src: int, dst: int, *, manifest_only: bool = False) -> None:
    s, d = os.path.join(root, checkpoint_dir(src)), os.path.join(root, checkpoint_dir(dst))
    if manifest_only:
        shutil.copyfile(os.path.join(s, MANIFEST), os.path.join(d, MANIFEST))
    else:
        shutil.rmtree(d)
        shutil.copytree(s, d)


def _damaged_folders(url: str) -> list[str]:
    return Storage(url).list_dir(DAMAGED_DIR)


# -- item 1: steps must agree --------------------------------------------------------------


@pytest.mark.parametrize("how", ["whole_folder", "manifest_only", "manifest_step_edited"])
def test_checkpoint_copied_over_another_is_damage(tmp_path, how, caplog, capsys):
    url = str(tmp_path / "run")
    states = _make_run(url)
    _copy_folder(url, 10, 15, manifest_only=how == "manifest_only")
    if how == "manifest_step_edited":
        # Folder 10 copied over 15 and its manifest's step rewritten to match the folder:
        # only the payload's own step gives it away.
        rel = os.path.join(url, checkpoint_dir(15), MANIFEST)
        data = json.loads(Path(rel).read_text())
        data["step"] = 15
        Path(rel).write_text(json.dumps(data))

    assert cli_main(["verify", url]) == 1
    out = capsys.readouterr().out
    expect = "payload holds step 10 but its folder is step 15" if how == "manifest_step_edited" \
        else "manifest says step 10 but its folder is step 15"
    assert "step 15: DAMAGED: " in out and expect in out, out

    with caplog.at_level(logging.WARNING, logger="spotrun"):
        step, model = _restore(url)
    assert step == 10
    assert _same(model, states[10])
    assert any("step 15" in r.getMessage() for r in caplog.records)
    # The impostor is kept as evidence, out of the way of the next save of step 15.
    assert [c.step for c in list_checkpoints(Storage(url))] == [5, 10]
    moved = _damaged_folders(url)
    assert len(moved) == 1 and moved[0].startswith(checkpoint_dir(15))
    note = json.loads(Storage(url).read_bytes(f"{DAMAGED_DIR}/{moved[0]}/damaged.json"))
    assert note["step"] == 15 and "step 10" in note["problem"]
    assert cli_main(["verify", url]) == 0
    assert "kept as evidence" in capsys.readouterr().out


def test_payload_step_mismatch_is_caught_on_every_backend_by_restore(tmp_path):
    """A payload copied in with a manifest rewritten to match its bytes (size, hash, step)."""
    url = str(tmp_path / "run")
    states = _make_run(url)
    folder15, folder10 = (os.path.join(url, checkpoint_dir(s)) for s in (15, 10))
    shutil.copyfile(os.path.join(folder10, "rank-00000.pt"), os.path.join(folder15, "rank-00000.pt"))
    m10 = json.loads(Path(folder10, MANIFEST).read_text())
    m10["step"] = 15
    Path(folder15, MANIFEST).write_text(json.dumps(m10))
    step, model = _restore(url)
    assert step == 10 and _same(model, states[10])


# -- item 3: a read error is not damage ---------------------------------------------------


class FaultFS(LocalFileSystem):
    """Local disk whose reads of matching files fail like an IAM mistake or a lost network.

    Writes and listings work, so the test can see that nothing changed.
    """

    protocol = ("faultfile",)
    fault: BaseException | None = None
    match = ".pt"
    reads = 0

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("faultfile://"):
            path = path[len("faultfile://"):]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", *args, **kwargs):
        if "r" in mode and FaultFS.fault is not None and str(path).endswith(FaultFS.match):
            FaultFS.reads += 1
            raise FaultFS.fault
        return super()._open(path, mode, *args, **kwargs)


fsspec.register_implementation("faultfile", FaultFS, clobber=True)


@pytest.fixture()
def faults():
    yield FaultFS
    FaultFS.fault, FaultFS.match, FaultFS.reads = None, ".pt", 0


@pytest.mark.parametrize("fault, match", [
    (PermissionError(13, "Access Denied (403)"), ".pt"),
    (ConnectionResetError(104, "Connection reset by peer"), ".pt"),
    (TimeoutError("read timed out"), ".pt"),
    (PermissionError(13, "Access Denied (403)"), MANIFEST),
    (OSError(5, "SlowDown: please reduce your request rate (after retries)"), MANIFEST),
])
def test_read_error_fails_the_start_and_changes_nothing(tmp_path, faults, fault, match):
    root = str(tmp_path / "run")
    _make_run(root)
    before = _snapshot(root)
    faults.fault, faults.match = fault, match
    url = f"faultfile://{root}"
    model = _model(seed=99)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointUnreadableError) as e, _ck(url, model=model, every_steps=1) as ck:
        for _ in ck.range(20):  # a fresh start here would overwrite folders 5, 10, 15
            pass
    msg = str(e.value)
    assert "\n" not in msg
    assert root in msg and "fix access" in msg and "not damage" in msg
    assert faults.reads >= 1
    faults.fault = None
    assert _snapshot(root) == before  # nothing written, moved or deleted
    assert _same(model, initial)  # no state applied from a checkpoint it could not read
    assert [c.step for c in list_checkpoints(Storage(root))] == [5, 10, 15]


def test_read_error_on_local_disk_fails_the_start(tmp_path, monkeypatch):
    """The memory-mapped local path: an EACCES/EIO from the load is not damage either."""
    url = str(tmp_path / "run")
    _make_run(url)
    before = _snapshot(url)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(CheckpointUnreadableError, match="step 15 .*permission denied"):
        _restore(url)
    monkeypatch.undo()
    assert _snapshot(url) == before


def test_missing_listed_file_is_damage(tmp_path, faults):
    """A file the manifest lists and storage does not have is damage: fall back."""
    root = str(tmp_path / "run")
    states = _make_run(root)
    os.unlink(os.path.join(root, checkpoint_dir(15), "rank-00000.pt"))
    step, model = _restore(root)
    assert step == 10 and _same(model, states[10])
    # Vanishing between the listing and the read (FileNotFoundError) counts the same.
    _make_run(str(tmp_path / "run2"))
    faults.fault, faults.match = FileNotFoundError(2, "No such file"), "000000000015/rank-00000.pt"
    step, _ = _restore(f"faultfile://{tmp_path / 'run2'}")
    assert step == 10


def test_verify_cli_read_error_is_not_reported_as_damage(tmp_path, faults, capsys):
    root = str(tmp_path / "run")
    _make_run(root)
    faults.fault = PermissionError(13, "Access Denied")
    assert cli_main(["verify", f"faultfile://{root}"]) == 2
    captured = capsys.readouterr()
    assert "DAMAGED" not in captured.out
    assert "permission denied" in captured.err and captured.err.count("\n") == 1


# -- item 4: every checkpoint damaged ----------------------------------------------------


def _damage_all(url: str, steps=(5, 10, 15)) -> None:
    st = Storage(url)
    for s in steps:
        rel = f"{checkpoint_dir(s)}/rank-00000.pt"
        st.write_bytes(rel, bytes(st.read_bytes(rel))[:100])  # truncated


def test_all_damaged_refuses_to_start_and_changes_nothing(tmp_path):
    url = str(tmp_path / "run")
    _make_run(url)
    _damage_all(url)
    before = _snapshot(url)
    with pytest.raises(AllCheckpointsDamagedError) as e, _ck(url, model=_model(), every_steps=1) as ck:
        for _ in ck.range(20):
            pass
    msg = str(e.value)
    assert "\n" not in msg
    for s in (5, 10, 15):
        assert f"step {s}: " in msg
    assert "if_all_damaged='start_fresh'" in msg and "SPOTRUN_IF_ALL_DAMAGED=start_fresh" in msg
    assert _snapshot(url) == before


@pytest.mark.parametrize("how", ["argument", "env"])
def test_all_damaged_start_fresh_moves_them_aside_first(tmp_path, monkeypatch, how):
    url = str(tmp_path / "run")
    _make_run(url)
    _damage_all(url)
    evidence = {rel: h for rel, h in _snapshot(url).items()}
    kw = {"if_all_damaged": "start_fresh"} if how == "argument" else {}
    if how == "env":
        monkeypatch.setenv("SPOTRUN_IF_ALL_DAMAGED", "start_fresh")
    model = _model()
    with _ck(url, model=model, every_steps=5, keep_last=1, **kw) as ck:
        assert ck.restore() == 0
        for _ in ck.range(15):
            pass
    # New checkpoints in the usual places (retention kept the newest one)...
    assert [c.step for c in list_checkpoints(Storage(url))] == [15]
    # ...and every damaged file, byte for byte, under damaged/.
    moved = _damaged_folders(url)
    assert len(moved) == 3
    now = _snapshot(url)
    for rel, digest in evidence.items():
        step_dir, name = rel.split(os.sep, 1)
        [dest] = [m for m in moved if m.startswith(step_dir)]
        assert now[os.path.join(DAMAGED_DIR, dest, name)] == digest


def test_if_all_damaged_is_validated(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="if_all_damaged"):
        _ck(str(tmp_path), model=_model(), if_all_damaged="yolo")
    monkeypatch.setenv("SPOTRUN_IF_ALL_DAMAGED", "sure")
    with pytest.raises(ConfigError, match="SPOTRUN_IF_ALL_DAMAGED"):
        _ck(str(tmp_path), model=_model())


def test_only_uncommitted_folders_is_still_a_fresh_start(tmp_path):
    """A kill -9 in the very first save leaves a folder without manifest: no refusal."""
    url = str(tmp_path / "run")
    os.makedirs(os.path.join(url, checkpoint_dir(5)))
    Path(url, checkpoint_dir(5), "rank-00000.pt").write_bytes(b"half")
    assert _restore(url)[0] == 0


def test_bit_flips_in_every_checkpoint_start_fresh_keeps_the_fresh_objects(tmp_path):
    """Damage seen only by the checksum is seen before anything loads (verify first): the
    objects are still the freshly built ones, so start_fresh starts at step 0 in the same
    process, with the model exactly as it was built."""
    url = str(tmp_path / "run")
    states = _make_run(url)
    st = Storage(url)
    for s in (5, 10, 15):
        _flip_byte(st, s, states[s])
    fresh = {k: v.clone() for k, v in _model(seed=99).state_dict().items()}
    step, model = _restore(url, if_all_damaged="start_fresh")
    assert step == 0 and _same(model, fresh)
    assert list_checkpoints(st) == [] and len(_damaged_folders(url)) == 3


class _Recording(torch.nn.Linear):
    """A model that records every state loaded into it."""

    def __init__(self) -> None:
        torch.manual_seed(99)
        super().__init__(4, 3)
        self.loaded: list[torch.Tensor] = []

    def load_state_dict(self, state, *args, **kwargs):  # type: ignore[override]
        self.loaded.append(state["weight"].clone())
        return super().load_state_dict(state, *args, **kwargs)


def test_damaged_newest_never_touches_the_model(tmp_path):
    """A bit flip in the newest checkpoint: the fallback to the previous one loads only that
    one into the model (the damaged state is never loaded, not even for a moment)."""
    url = str(tmp_path / "run")
    states = _make_run(url)
    _flip_byte(Storage(url), 15, states[15])
    model = _Recording()
    with _ck(url, model=model) as ck:
        assert ck.restore() == 10
    assert len(model.loaded) == 1 and torch.equal(model.loaded[0], states[10]["weight"])
    assert _same(model, states[10])


def test_damaged_newest_is_moved_aside_not_overwritten(tmp_path):
    """Fallback to step 10, then the run saves step 15 again: a new folder, and the damaged
    one is still there, byte for byte."""
    url = str(tmp_path / "run")
    states = _make_run(url)
    _flip_byte(Storage(url), 15, states[15])
    damaged = Path(url, checkpoint_dir(15), "rank-00000.pt").read_bytes()
    model = _model()
    with _ck(url, model=model, every_steps=5, keep_last=10) as ck:
        assert ck.restore() == 10
        for _ in ck.range(20):
            pass
    assert [c.step for c in list_checkpoints(Storage(url))] == [5, 10, 15, 20]
    [moved] = _damaged_folders(url)
    assert Path(url, DAMAGED_DIR, moved, "rank-00000.pt").read_bytes() == damaged
    assert cli_main(["verify", url]) == 0


@pytest.fixture(params=["memory", "s3"])
def remote_url(request):
    if request.param == "memory":
        return f"memory://spotrun-restore/{uuid.uuid4().hex}"
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/{uuid.uuid4().hex[:8]}"


def test_fallback_and_quarantine_on_object_stores(remote_url):
    states = _make_run(remote_url)
    st = Storage(remote_url)
    # Manifest of 10 copied over 15's: a folder/manifest step mismatch.
    st.write_bytes(f"{checkpoint_dir(15)}/{MANIFEST}", bytes(st.read_bytes(f"{checkpoint_dir(10)}/{MANIFEST}")))
    payload15 = bytes(st.read_bytes(f"{checkpoint_dir(15)}/rank-00000.pt"))
    step, model = _restore(remote_url)
    assert step == 10 and _same(model, states[10])
    assert [c.step for c in list_checkpoints(st)] == [5, 10]
    [moved] = st.list_dir(DAMAGED_DIR)
    assert sorted(st.list_dir(f"{DAMAGED_DIR}/{moved}")) == ["damaged.json", MANIFEST, "rank-00000.pt"]
    assert bytes(st.read_bytes(f"{DAMAGED_DIR}/{moved}/rank-00000.pt")) == payload15


def test_prune_moves_a_damaged_old_checkpoint_aside(tmp_path):
    url = str(tmp_path / "run")
    _make_run(url)
    st = Storage(url)
    st.write_bytes(f"{checkpoint_dir(5)}/{MANIFEST}", b"{not json")
    assert prune(st, keep_last=1, newest_committed=15) == [5, 10]
    assert [c.step for c in list_checkpoints(st)] == [15]
    [moved] = st.list_dir(DAMAGED_DIR)
    assert moved.startswith(checkpoint_dir(5))


def test_prune_does_not_fail_a_committed_save_on_a_read_error(tmp_path, faults, caplog):
    root = str(tmp_path / "run")
    _make_run(root)
    faults.fault, faults.match = PermissionError(13, "Access Denied"), MANIFEST
    with caplog.at_level(logging.WARNING, logger="spotrun"):
        assert prune(Storage(f"faultfile://{root}"), keep_last=1, newest_committed=15) == []
    assert any("retention skipped" in r.getMessage() for r in caplog.records)
    faults.fault = None
    assert [c.step for c in list_checkpoints(Storage(root))] == [5, 10, 15]


def test_example_refuses_all_damaged_then_starts_fresh_with_the_env_var(tmp_path):
    """End to end through a real training script: no code change needed to override."""
    url = str(tmp_path / "run")
    args = [sys.executable, EXAMPLE, "--steps", "30", "--every-steps", "10", "--step-sleep", "0"]

    def run(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=env_for(url, **env), capture_output=True, text=True,
                              timeout=180, cwd=REPO, check=False)

    done = run()
    assert done.returncode == EXIT_FINISHED, done.stdout + done.stderr
    steps = [c.step for c in list_checkpoints(Storage(url))]
    _damage_all(url, steps)
    os.unlink(os.path.join(url, "done.json"))
    before = _snapshot(url)
    refused = run()
    assert refused.returncode not in (0, 75)
    assert "AllCheckpointsDamagedError" in refused.stderr and "SPOTRUN_IF_ALL_DAMAGED" in refused.stderr
    assert _snapshot(url) == before
    fresh = run(SPOTRUN_IF_ALL_DAMAGED="start_fresh")
    assert fresh.returncode == EXIT_FINISHED, fresh.stdout + fresh.stderr
    assert len(_damaged_folders(url)) == len(steps)


# -- item 5: state that cannot be loaded back is refused at save time ----------------------


class _Holder:
    """A stateful object whose state_dict() returns whatever the test puts in it."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


@pytest.mark.parametrize("where", ["objects", "per_rank"])
@pytest.mark.parametrize("state, path, hint", [
    ({"arr": np.zeros(3)}, "['arr']", "torch.from_numpy"),
    ({"rng": np.random.get_state()}, "['rng'][1]", "np.random.get_state"),
    ({"nested": [{"ok": 1}, {"best": np.float64(0.5)}]}, "['nested'][1]['best']", "float(x)"),
    ({"cfg": {"point": _Pt(1)}}, "['cfg']['point']", "add_safe_globals"),
])
def test_unloadable_state_refused_at_save_naming_the_key(tmp_path, where, state, path, hint):
    url = str(tmp_path / "run")
    with _ck(url, model=_model(), **{where: {"thing": _Holder(state)}}) as ck:
        ck.restore()
        with pytest.raises(UnloadableStateError) as e:
            ck.save()
    msg = str(e.value)
    assert "\n" not in msg
    assert f"thing.state_dict(){path} is a " in msg and hint in msg, msg
    assert isinstance(e.value, ConfigError)
    assert list_checkpoints(Storage(url)) == []  # nothing written


def test_numpy_scalar_value_refused_at_save(tmp_path):
    """values= were checked with isinstance: np.float64 (a float subclass) passed and then
    every resume failed."""
    with _ck(str(tmp_path / "run"), model=_model(), values={"best": np.float64(0.5)}) as ck:
        ck.restore()
        with pytest.raises(UnloadableStateError, match="'best' is a numpy.float64"):
            ck.save()


class _MyTensor(torch.Tensor):
    pass


class _Point:
    def __init__(self, x=0):
        self.x = x


_CASES = {
    "tensor": torch.zeros(3), "parameter": torch.nn.Parameter(torch.zeros(2)),
    "bf16": torch.zeros(2, dtype=torch.bfloat16), "sparse": torch.zeros(3, 3).to_sparse(),
    "int": 1, "bigint": 2**80, "float": 1.5, "nan": float("nan"), "complex": 1j, "bool": True,
    "none": None, "str": "s", "bytes": b"b", "bytearray": bytearray(b"a"),
    "list": [1, "a", None], "tuple": (1, 2.0), "set": {1, 2}, "dict_int_keys": {1: 2},
    "dict_tuple_keys": {(1, 2): 3}, "odict": collections.OrderedDict(a=1),
    "counter": collections.Counter("aab"), "size": torch.Size([2, 3]), "dtype": torch.float16,
    "device": torch.device("cpu"), "layout": torch.strided,
    "module_state": torch.nn.Linear(2, 2).state_dict(),
    "optimizer_state": torch.optim.Adam(torch.nn.Linear(2, 2).parameters()).state_dict(),
    "np_array": np.zeros(2), "np_float64": np.float64(1.0), "np_int64": np.int64(3),
    "np_dtype": np.dtype("float32"), "np_random_state": np.random.get_state(),
    "frozenset": frozenset({1}), "defaultdict": collections.defaultdict(int),
    "deque": collections.deque([1]), "namedtuple": _Pt(1),
    "tensor_subclass": torch.zeros(2).as_subclass(_MyTensor), "generator": torch.Generator(),
    "range": range(3), "slice": slice(1), "object": _Point(),
    "numpy_key": {np.int64(1): 2}, "nested_bad": {"a": [1, {"b": (2, np.zeros(1))}]},
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_check_agrees_with_weights_only_load(name):
    """The walk accepts exactly what torch.load(weights_only=True) loads back."""
    value = _CASES[name]
    buf = io.BytesIO()
    torch.save({"v": value}, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
        loads = True
    except Exception:  # noqa: BLE001 - any refusal
        loads = False
    try:
        check_loadable("v", value)
        accepted = True
    except UnloadableStateError:
        accepted = False
    assert accepted == loads, f"{name}: check says {accepted}, torch.load says {loads}"


def test_safe_globals_allow_a_class(tmp_path):
    """A class the user allowed with torch.serialization's safe globals saves and loads."""
    with torch.serialization.safe_globals([_Point]):
        check_loadable("v", {"p": _Point(3)})
        url = str(tmp_path / "run")
        with _ck(url, model=_model(), objects={"thing": _Holder({"p": _Point(3)})}) as ck:
            ck.restore()
            ck.save()
        holder = _Holder(None)
        with _ck(url, model=_model(), objects={"thing": holder}) as ck:
            assert ck.restore() == 0
        assert holder.state["p"].x == 3
    with pytest.raises(UnloadableStateError, match="v\\['p'\\] is a "):
        check_loadable("v", {"p": _Point(3)})


def test_values_still_need_plain_keys():
    with pytest.raises(UnloadableStateError, match="key of type tuple"):
        check_plain("cfg", {(1, 2): 3})
    check_plain("cfg", {"a": [1, 2.0, "x", None, torch.zeros(1)], 3: (True,)})


def test_check_is_cheap_on_a_few_hundred_tensors():
    """It runs in the training thread on every save: no serialisation, no tensor reads."""
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(150)])  # 300 tensors
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 16)).sum().backward()
    opt.step()
    states = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    n_tensors = sum(isinstance(v, torch.Tensor) for v in states["model"].values()) + sum(
        isinstance(v, torch.Tensor) for s in states["optimizer"]["state"].values() for v in s.values())
    assert n_tensors >= 900
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        for name, state in states.items():
            check_loadable(name, state)
        best = min(best, time.perf_counter() - t0)
    print(f"check_loadable: {n_tensors} tensors in {best * 1e3:.3f} ms")
    assert best < 0.05  # far below any real save's stall, even on a loaded CPU


@pytest.mark.slow
def test_all_damaged_fails_every_rank_under_torchrun(tmp_path, warm_ranks):
    """Rank 0 refuses; the other rank learns it from rank 0 instead of waiting forever."""
    from test_distributed import _finish, _launch

    url = str(tmp_path / "run")
    code, out = _finish(_launch(url, warm=warm_ranks))
    assert code == EXIT_FINISHED, out[-4000:]
    st = Storage(url)
    for info in list_checkpoints(st):
        for name in info.manifest.files:
            rel = f"{info.name}/{name}"
            st.write_bytes(rel, bytes(st.read_bytes(rel))[:64])
    os.unlink(os.path.join(url, "done.json"))
    before = _snapshot(url)
    code, out = _finish(_launch(url, warm=warm_ranks))  # fails the test on a hang
    assert code not in (0, 75), out[-4000:]
    assert "AllCheckpointsDamagedError" in out, out[-4000:]
    # Every rank takes the decision itself (the restore is collective): none is left waiting.
    assert "[rank1]: spotrun.errors.AllCheckpointsDamagedError" in out, out[-4000:]
    assert _snapshot(url) == before
