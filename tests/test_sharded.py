"""Sharded (DCP) checkpoints: FSDP2 + AdamW under real torchrun processes, gloo on CPU.

Saved on N ranks, loaded on M: the gathered full model and optimizer state after the load
must equal the saved one exactly (tests/scripts/fsdp_sharded.py compares with torch.equal).
Single-process tests cover the storage writer/reader, verification and error classes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from helpers import REPO, finish_session, torchrun
from warmfork import WarmExec

from spotrun.errors import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    SaveError,
    StorageError,
)
from spotrun.format.commit import commit, list_checkpoints, read_manifest, verify_checkpoint
from spotrun.format.manifest import Manifest
from spotrun.format.sharded import (
    DCP_METADATA,
    ShardedSaver,
    is_sharded,
    is_sharded_checkpoint,
    read_full,
    read_sharded,
    write_sharded,
)
from spotrun.storage import Storage

SCRIPT = str(REPO / "tests" / "scripts" / "fsdp_sharded.py")
TIMEOUT = 420  # 4 CPU ranks on a loaded 2-core machine are slow; a hang must still end


def _torchrun(nproc: int, *args: str, env: dict, warm: WarmExec) -> str:
    """Plain torchrun of the script, its ranks forks of ``warm`` (the ``warm_ranks`` fixture)."""
    code, out = finish_session(torchrun(SCRIPT, nproc, *args, env=env, wrapper=False, warm=warm), TIMEOUT)
    assert code == 0, out[-6000:]
    return out


def _ok_ranks(out: str, what: str) -> set[int]:
    return {int(r) for r in re.findall(rf"rank (\d+) ok {what}", out)}


def _save(nproc: int, url: str, ref: Path, env: dict, warm: WarmExec, *extra: str) -> str:
    out = _torchrun(nproc, "save", "--url", url, "--reference", str(ref), *extra, env=env, warm=warm)
    assert _ok_ranks(out, "saved") == set(range(nproc)), out[-4000:]
    return out


def _load(nproc: int, url: str, ref: Path, env: dict, warm: WarmExec, *extra: str
          ) -> dict[int, tuple[list[int], list[int]]]:
    """Load on ``nproc`` ranks, compared with the reference; per rank, which optimizers had
    their state made from DCP's index and how many optimizer steps each ran in the load."""
    out = _torchrun(nproc, "load", "--url", url, "--reference", str(ref), *extra, env=env,
                    warm=warm)
    assert _ok_ranks(out, "loaded") == set(range(nproc)), out[-4000:]
    found = re.findall(r"^rank (\d+) load made \[([\d, ]*)\] ran steps \[([\d, ]*)\]$", out,
                       re.MULTILINE)
    return {int(r): ([int(i) for i in made.split(",") if i.strip()],
                     [int(i) for i in steps.split(",")]) for r, made, steps in found}


def _check_manifest(url: str, world: int) -> Manifest:
    storage = Storage(url)
    manifest = read_manifest(storage, 3)
    assert manifest.world_size == world
    assert is_sharded_checkpoint(manifest)
    # One shard file per rank; small files of non-tensor values where DCP put some.
    shards = {f"__{r}_0.distcp" for r in range(world)}
    values = {f"__{r}_1.distcp" for r in range(world)}
    assert {DCP_METADATA} | shards <= set(manifest.files) <= {DCP_METADATA} | shards | values
    assert verify_checkpoint(storage, manifest) == []
    # Whole tensors (AdamW's per-parameter step) sit beside the values in the small files,
    # which every rank reads on restore; a shard file holds shards only, so a rank reads
    # its own shard file and no other's.
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from spotrun.format.sharded import SpotrunStorageReader

    md = SpotrunStorageReader(storage, manifest).metadata
    kinds = {"whole": set(), "shard": set()}
    for index, info in md.storage_data.items():
        meta = md.state_dict_metadata[index.fqn]
        if isinstance(meta, TensorStorageMetadata):
            chunk = next(c for c in meta.chunks if c.offsets == index.offset)
            kind = "whole" if tuple(chunk.sizes) == tuple(meta.size) else "shard"
            kinds[kind].add(info.relative_path[-len("_0.distcp"):])
    assert kinds == {"whole": {"_1.distcp"}, "shard": {"_0.distcp"}}, kinds
    return manifest


# -- multi-process ---------------------------------------------------------------------


@pytest.mark.slow
def test_save_on_4_load_on_2_3(tmp_path: Path, child_env: dict, warm_ranks: WarmExec) -> None:
    # 4 -> 4 is the same-world-size path, covered end to end in test_sharded_checkpointer.
    url, ref = str(tmp_path / "run"), tmp_path / "ref.pt"
    _save(4, url, ref, child_env, warm_ranks)
    _check_manifest(url, 4)
    for nproc in (2, 3):
        # The fresh AdamW's state is made from the index: no optimizer step in the load.
        assert _load(nproc, url, ref, child_env, warm_ranks) == dict.fromkeys(range(nproc),
                                                                            ([0], [0]))


@pytest.mark.slow
def test_mixed_optimizers_save_on_2_load_on_3(tmp_path: Path, child_env: dict,
                                              warm_ranks: WarmExec) -> None:
    """AdamW (amsgrad, two param groups, a frozen parameter) and SGD with momentum get their
    state from the index on 3 ranks, resharded from 2; an optimizer whose state is shaped
    otherwise (one value per row) keeps torch's zero-gradient step. Every one of them loads
    exactly (the script compares the gathered state)."""
    url, ref = str(tmp_path / "run"), tmp_path / "ref.pt"
    _save(2, url, ref, child_env, warm_ranks, "--optim", "mixed")
    loaded = _load(3, url, ref, child_env, warm_ranks, "--optim", "mixed")
    assert set(loaded) == {0, 1, 2}
    for made, steps in loaded.values():
        assert made == [0, 1] and steps[:2] == [0, 0] and steps[2] >= 1, (made, steps)


@pytest.mark.slow
def test_async_save_on_2_overlaps_collectives_then_load_on_4(tmp_path: Path, child_env: dict,
                                                            warm_ranks: WarmExec) -> None:
    # slowdcp:// (defined in the script) sleeps on every shard write, so the background
    # write is still going while the training thread runs its all_reduces.
    env = dict(child_env, SPOTRUN_TEST_WRITE_DELAY="0.2")
    url, ref = f"slowdcp://{tmp_path / 'run'}", tmp_path / "ref.pt"
    out = _save(2, url, ref, env, warm_ranks, "--async")
    overlapped = [int(n) for n in re.findall(r"rank \d+ overlapped (\d+) of", out)]
    assert len(overlapped) == 2 and all(n > 0 for n in overlapped), out[-4000:]
    _check_manifest(str(tmp_path / "run"), 2)
    _load(4, str(tmp_path / "run"), ref, child_env, warm_ranks)


@pytest.mark.slow
def test_damaged_shard_raises_corrupt_on_every_rank(tmp_path: Path, child_env: dict, warm_ranks: WarmExec) -> None:
    url, ref = str(tmp_path / "run"), tmp_path / "ref.pt"
    _save(2, url, ref, child_env, warm_ranks)
    shard = tmp_path / "run" / "000000000003" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the sha256 catches it
    shard.write_bytes(bytes(data))
    out = _torchrun(2, "load", "--url", url, "--reference", str(ref), "--expect-error",
                    env=child_env, warm=warm_ranks)
    errors = re.findall(r"rank \d+ error [^\n]*", out)
    assert len(errors) == 2 and all("CorruptCheckpointError" in e and "__1_0.distcp" in e
                                    for e in errors), out[-4000:]
    # One process reading both ranks' files (read and verified in parallel) names the same
    # file, whichever read finishes first.
    storage = Storage(url)
    with pytest.raises(CorruptCheckpointError, match="__1_0.distcp"):
        read_full(storage, read_manifest(storage, 3))


@pytest.mark.slow
def test_sharded_on_s3(s3_bucket: str, tmp_path: Path, child_env: dict, warm_ranks: WarmExec) -> None:
    url, ref = f"s3://{s3_bucket}/fsdp", tmp_path / "ref.pt"
    _save(2, url, ref, child_env, warm_ranks)
    _check_manifest(url, 2)
    _load(3, url, ref, child_env, warm_ranks)


# -- single process --------------------------------------------------------------------


def _state() -> dict:
    torch.manual_seed(1)
    return {"model": {"w": torch.randn(5, 7), "b": torch.arange(4.0)},
            "optim": {"step": 3, "lr": 0.5, "names": ["a", "b"]}}


def _zero_like(state: dict) -> dict:
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
            "optim": {"step": 0, "lr": 0.0, "names": []}}


def _write_and_commit(url: str, state: dict, step: int = 7) -> tuple[Storage, Manifest]:
    storage = Storage(url)
    files = write_sharded(storage, step, state)
    manifest = Manifest(step=step, files=dict(files))
    commit(storage, manifest)
    return storage, manifest


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_roundtrip_single_process(tmp_path: Path, scheme: str) -> None:
    url = str(tmp_path / "run") if scheme == "local" else f"memory://sharded-{os.getpid()}-rt"
    state = _state()
    storage, manifest = _write_and_commit(url, state)
    # Tensors in __0_0, the non-tensor values (the optimizer's lr) in the small __0_1.
    assert sorted(manifest.files) == [DCP_METADATA, "__0_0.distcp", "__0_1.distcp"]
    assert verify_checkpoint(storage, read_manifest(storage, 7)) == []
    target = _zero_like(state)
    read_sharded(storage, manifest, target)
    assert torch.equal(target["model"]["w"], state["model"]["w"])
    assert torch.equal(target["model"]["b"], state["model"]["b"])
    assert target["optim"] == state["optim"]


def test_plain_dcp_reader_can_read_a_local_copy(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = _state()
    _write_and_commit(str(tmp_path / "run"), state)
    target = _zero_like(state)
    dcp.load(target, checkpoint_id=str(tmp_path / "run" / "000000000007"), no_dist=True)
    assert torch.equal(target["model"]["w"], state["model"]["w"])


def test_truncated_and_missing_files_are_corrupt(tmp_path: Path) -> None:
    storage, manifest = _write_and_commit(str(tmp_path / "run"), _state())
    folder = tmp_path / "run" / "000000000007"
    shard = folder / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        read_sharded(storage, manifest, _zero_like(_state()))
    shard.unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        read_sharded(storage, manifest, _zero_like(_state()))
    (folder / DCP_METADATA).write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="metadata"):
        read_sharded(storage, manifest, _zero_like(_state()))


def test_malicious_metadata_is_refused(tmp_path: Path) -> None:
    import hashlib
    import pickle

    storage, manifest = _write_and_commit(str(tmp_path / "run"), _state())

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    raw = pickle.dumps(Evil())
    (tmp_path / "run" / "000000000007" / DCP_METADATA).write_bytes(raw)
    from spotrun.format.manifest import FileEntry

    manifest.files[DCP_METADATA] = FileEntry(len(raw), hashlib.sha256(raw).hexdigest())
    with pytest.raises(CorruptCheckpointError, match="not allowed"):
        read_sharded(storage, manifest, _zero_like(_state()))
    assert not (tmp_path / "pwned").exists()


def test_access_error_is_storage_error_not_damage(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root reads through permission bits; a vanished run folder is the access error.
        storage, manifest = _write_and_commit(str(tmp_path / "run"), _state())
        import shutil

        shutil.rmtree(tmp_path / "run")
        with pytest.raises(StorageError) as info:
            read_sharded(storage, manifest, _zero_like(_state()))
        assert not isinstance(info.value, CorruptCheckpointError)
        return
    storage, manifest = _write_and_commit(str(tmp_path / "run"), _state())
    (tmp_path / "run" / "000000000007" / DCP_METADATA).chmod(0)
    with pytest.raises(StorageError):
        read_sharded(storage, manifest, _zero_like(_state()))


def test_replicated_checkpoint_is_refused(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "run"))
    manifest = Manifest(step=1, files={})
    with pytest.raises(IncompatibleCheckpointError, match="not a sharded"):
        read_sharded(storage, manifest, _zero_like(_state()))


def test_missing_key_is_incompatible(tmp_path: Path) -> None:
    storage, manifest = _write_and_commit(str(tmp_path / "run"), _state())
    target = _zero_like(_state())
    target["model"]["extra"] = torch.zeros(2)
    with pytest.raises(IncompatibleCheckpointError):
        read_sharded(storage, manifest, target)


def test_is_sharded_plain_objects() -> None:
    model = torch.nn.Linear(2, 2)
    assert not is_sharded(model)
    assert not is_sharded(torch.optim.AdamW(model.parameters()))
    assert not is_sharded(_state())


def test_saver_stage_reuses_buffers_and_sees_new_values(tmp_path: Path) -> None:
    saver = ShardedSaver(Storage(str(tmp_path / "run")))
    try:
        state = _state()
        first = saver.stage(state)
        buf = first["model"]["w"]
        assert buf.data_ptr() != state["model"]["w"].data_ptr()
        state["model"]["w"].add_(1)
        state["optim"]["lr"] = 0.25
        second = saver.stage(state)
        assert second["model"]["w"].data_ptr() == buf.data_ptr()  # reused
        assert torch.equal(second["model"]["w"], state["model"]["w"])
        assert second["optim"]["lr"] == 0.25
        files = saver.write_async(9, second).result()
        assert {n for n, _ in files} == {DCP_METADATA, "__0_0.distcp", "__0_1.distcp"}
        # A changed structure makes new buffers.
        state["model"]["w"] = torch.zeros(3)
        assert saver.stage(state)["model"]["w"].shape == (3,)
    finally:
        saver.close()


def test_saver_reuses_its_save_plan_until_the_layout_changes(tmp_path: Path) -> None:
    # DCP's plan (and .metadata's index) is made once per state layout; a layout that
    # changed between saves must be planned again, or .metadata describes the old one.
    storage = Storage(str(tmp_path / "run"))
    saver = ShardedSaver(storage)

    def save(step: int, state: dict) -> None:
        files = saver.write(step, saver.stage(state))
        commit(storage, Manifest(step=step, files=dict(files)))

    def loaded(step: int, like: dict) -> dict:
        target = {"model": {k: torch.zeros_like(v) for k, v in like["model"].items()},
                  "optim": {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
                            for k, v in like["optim"].items()}}
        read_sharded(storage, read_manifest(storage, step), target)
        return target

    try:
        state = _state()
        save(1, state)
        state["model"]["w"].add_(1)
        state["optim"]["lr"] = 0.25
        save(2, state)
        assert saver.plans_made == 1  # the second save reused the first one's plan
        got = loaded(2, state)
        assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["optim"]["lr"] == 0.25
        # Same tensors, other layouts: a shape, a new key, a value that became a tensor.
        state["model"]["w"] = torch.arange(6.0).reshape(2, 3)
        state["model"]["extra"] = torch.full((4,), 7.0)
        state["optim"]["lr"] = torch.tensor(0.125)
        save(3, state)
        got = loaded(3, state)  # a stale plan: .metadata has no "extra", w the old shape
        for k, v in state["model"].items():
            assert torch.equal(got["model"][k], v), k
        assert torch.equal(got["optim"]["lr"], state["optim"]["lr"])
        assert got["optim"]["names"] == ["a", "b"] and got["optim"]["step"] == 3
        assert saver.plans_made == 2
    finally:
        saver.close()


def test_failed_write_raises_save_error_and_commits_nothing(tmp_path: Path) -> None:
    storage, _ = _write_and_commit(str(tmp_path / "run"), _state(), step=7)
    folder = tmp_path / "run" / "000000000008"
    folder.mkdir()
    folder.chmod(0o500)  # the shard cannot be created (root ignores this: see below)
    if os.geteuid() == 0:
        folder.chmod(0o700)
        folder.rmdir()
        folder.write_bytes(b"")  # a file where the folder must go: makedirs fails for root too
    with pytest.raises(SaveError, match="step 8 .* failed .*previous checkpoint is untouched"):
        write_sharded(storage, 8, _state())
    assert [c.step for c in list_checkpoints(storage) if c.status == "committed"] == [7]
