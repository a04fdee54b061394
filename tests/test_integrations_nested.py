"""Trainer checkpoint folders with subfolders (issue 23 item 11): the layouts FSDP and
DeepSpeed runs write, committed under the protocol (every file, at any depth, listed in the
manifest with its size and checksums) and put back as written, on local disk and S3.

The trees are built with the file names and folder shapes those libraries write (Accelerate
/ the HF Trainer under FSDP with SHARDED_STATE_DICT: ``pytorch_model_fsdp_0/`` and
``optimizer_0/`` DCP folders; DeepSpeed ZeRO: ``global_step<N>/`` shard files and a
``latest`` file); the contents are random bytes of uneven sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import committed_steps

from spotrun.errors import AllCheckpointsDamagedError
from spotrun.format.commit import commit, list_damaged, read_manifest, verify_checkpoint
from spotrun.integrations._session import RunSession
from spotrun.records.layout import checkpoint_dir
from spotrun.storage import Storage

DEEPSPEED = [
    "latest",
    "zero_to_fp32.py",
    "trainer_state.json",
    "global_step{step}/mp_rank_00_model_states.pt",
    "global_step{step}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "global_step{step}/zero_pp_rank_1_mp_rank_00_optim_states.pt",
]
FSDP = [
    "trainer_state.json",
    "scheduler.pt",
    "rng_state_0.pth",
    "rng_state_1.pth",
    "pytorch_model_fsdp_0/.metadata",
    "pytorch_model_fsdp_0/__0_0.distcp",
    "pytorch_model_fsdp_0/__1_0.distcp",
    "optimizer_0/.metadata",
    "optimizer_0/__0_0.distcp",
    "optimizer_0/__1_0.distcp",
]


def write_tree(root: Path, names: list[str], step: int) -> dict[str, bytes]:
    files = {}
    for i, pattern in enumerate(names):
        name = pattern.format(step=step)
        data = f'{{"global_step": {step}}}'.encode() if name == "trainer_state.json" else \
            os.urandom(1000 + 977 * i)
        if name == "latest":
            data = f"global_step{step}".encode()
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        files[name] = data
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _session(url: str) -> RunSession:
    return RunSession(url, handle_signals=False, watchers=[], keep_last=3)


@pytest.mark.parametrize("layout", [DEEPSPEED, FSDP], ids=["deepspeed", "fsdp"])
def test_nested_folder_commits_every_file_and_restores_as_written(tmp_path, layout):
    url = str(tmp_path / "run")
    session = _session(url)
    session.start()
    written = {}
    for step in (10, 20):
        folder = tmp_path / f"trainer-{step}"
        written[step] = write_tree(folder, layout, step)
        session.commit_folder(step, str(folder))
    session.close("stopped")

    manifest = read_manifest(Storage(url), 20)
    assert sorted(manifest.files) == sorted(written[20])  # every file, at every depth
    for name, data in written[20].items():
        assert manifest.files[name].size == len(data)
    assert verify_checkpoint(Storage(url), manifest, deep=True) == []

    # A nested file damaged: found by the deep verification, step 20 moved aside, 10 used.
    shard = next(n for n in written[20] if "/" in n)
    target = Path(url) / checkpoint_dir(20) / shard
    data = target.read_bytes()
    target.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # one byte changed, size kept
    again = _session(url)
    path = again.resume_dir(str(tmp_path / "local"))
    assert path == str(Path(url) / checkpoint_dir(10))
    restored = read_tree(Path(path))
    assert restored.pop("manifest.json") and restored == written[10]
    assert len(list_damaged(Storage(url))) == 1
    again.close("stopped")


def test_a_missing_nested_file_is_damage(tmp_path):
    url = str(tmp_path / "run")
    session = _session(url)
    session.start()
    write_tree(tmp_path / "t", FSDP, 5)
    session.commit_folder(5, str(tmp_path / "t"))
    session.close("stopped")
    os.remove(Path(url) / checkpoint_dir(5) / "optimizer_0" / "__1_0.distcp")
    problems = verify_checkpoint(Storage(url), read_manifest(Storage(url), 5), deep=False)
    assert len(problems) == 1 and "optimizer_0/__1_0.distcp: missing" in problems[0]


def test_s3_nested_folder_is_uploaded_and_downloaded_as_written(tmp_path, s3_bucket):
    url = f"s3://{s3_bucket}/nested"
    session = _session(url)
    session.start()
    written = write_tree(tmp_path / "ds", DEEPSPEED, 7)
    session.commit_folder(7, str(tmp_path / "ds"))
    session.close("stopped")
    assert committed_steps(url) == [7]

    again = _session(url)
    path = again.resume_dir(str(tmp_path / "local"))
    assert path == str(tmp_path / "local" / "spotrun-resume" / checkpoint_dir(7))
    assert read_tree(Path(path)) == written
    again.close("stopped")


def test_manifest_naming_a_file_outside_its_folder_is_damage_never_followed(tmp_path, s3_bucket):
    """A manifest is data read from storage: ``../`` names are refused before any download."""
    url = f"s3://{s3_bucket}/escape"
    storage = Storage(url)
    entry = storage.write_bytes(f"{checkpoint_dir(3)}/a", b"x")
    storage.write_bytes("escaped", b"y")
    from spotrun.format.manifest import Manifest

    commit(storage, Manifest(step=3, files={"a": entry, "../escaped": entry}))
    session = _session(url)
    with pytest.raises(AllCheckpointsDamagedError, match="outside its checkpoint folder"):
        session.resume_dir(str(tmp_path / "local" / "deep"))
    session.close("stopped")
    assert not (tmp_path / "local" / "escaped").exists()
    assert not list((tmp_path / "local").rglob("escaped"))


FSDP_SCRIPT = str(Path(__file__).parent / "scripts" / "fsdp_folder_train.py")


def _torchrun(url: str, staging: Path, warm, *extra: str) -> tuple[int, str]:
    """Plain torchrun, 2 ranks, forks of ``warm`` (the ``warm_ranks`` fixture)."""
    from helpers import env_for, finish_session, torchrun

    proc = torchrun(FSDP_SCRIPT, 2, "--url", url, "--staging", str(staging), "--steps", "12",
                    "--save-steps", "4", *extra, env=env_for(url), wrapper=False, warm=warm)
    return finish_session(proc, 400)


def _digest(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("full-state ")]
    return line.split()[1]


@pytest.mark.slow
def test_fsdp_sharded_folder_on_two_gloo_ranks_stops_and_resumes_exactly(tmp_path, warm_ranks):
    """FSDP2 on 2 CPU ranks writes the FSDP trainer layout (DCP shard folders), spotrun
    commits it; stopped at step 6 and resumed, the final gathered model and optimizer are
    bit-identical to the uninterrupted run's."""
    ref_url, url = str(tmp_path / "ref"), str(tmp_path / "run")
    code, out = _torchrun(ref_url, tmp_path / "s0", warm_ranks)
    assert code == 0, out[-3000:]
    reference = _digest(out)

    code, out = _torchrun(url, tmp_path / "s1", warm_ranks, "--stop-at", "6")
    assert code != 0 and "rank 0 exit 75" in out and "rank 1 exit 75" in out, out[-3000:]
    assert committed_steps(url) == [4, 6]
    files = read_manifest(Storage(url), 6).files
    for name in ("pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp",
                 "pytorch_model_fsdp_0/__1_0.distcp", "optimizer_0/__1_0.distcp",
                 "rng_state_1.pth", "trainer_state.json"):
        assert name in files

    code, out = _torchrun(url, tmp_path / "s2", warm_ranks)
    assert code == 0, out[-3000:]
    assert "rank 0 start 6" in out and "rank 1 start 6" in out
    assert _digest(out) == reference
    assert committed_steps(url) == [4, 6, 8, 12]
