"""One storage and commit-protocol suite, run against local disk, memory:// and S3 (moto)."""

from __future__ import annotations

import logging
import uuid

import pytest
import torch

import spotrun
from spotrun.format.commit import find_latest_valid, list_checkpoints
from spotrun.records.layout import MANIFEST, checkpoint_dir
from spotrun.storage import Storage


@pytest.fixture(params=["local", "memory", "s3"])
def run_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    if request.param == "memory":
        return f"memory://spotrun-tests/{uuid.uuid4().hex}"
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/{uuid.uuid4().hex[:8]}"


def test_atomic_write_read_list_remove(run_url):
    st = Storage(run_url)
    st.ensure_root(create=True)
    entry = st.write_bytes("a/one.bin", b"hello")
    assert st.read_bytes("a/one.bin") == b"hello"
    assert entry.size == 5 and len(entry.crc32c) == 1 and st.verify("a/one.bin", entry) is None
    assert st.list_dir() == ["a"] and st.list_dir("a") == ["one.bin"]
    assert st.list_dir("missing") == []
    # A write that fails part-way leaves nothing behind.
    with pytest.raises(RuntimeError):
        with st.open_write("a/two.bin") as f:
            f.write(b"x" * (6 << 20))
            raise RuntimeError("boom")
    assert not st.exists("a/two.bin")
    assert st.write_if_absent("a/three.bin", b"1") is True
    assert st.write_if_absent("a/three.bin", b"2") is False
    assert st.read_bytes("a/three.bin") == b"1"
    st.remove("a")
    assert st.list_dir() == []


def _model_and_opt(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, opt


def _train(model, opt, steps):
    for _ in range(steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_save_restore_roundtrip_and_retention(run_url):
    model, opt = _model_and_opt(0)
    with spotrun.Checkpointer(run_url, model=model, optimizer=opt, every_steps=2, keep_last=2,
                              values={"epoch": 3}, handle_signals=False, watchers=[]) as ck:
        assert ck.restore() == 0
        for step in range(1, 8):
            _train(model, opt, 1)
            ck.step(step)
        ck.values["epoch"] = 4
        ck.save()
    steps = [c.step for c in list_checkpoints(Storage(run_url)) if c.status == "committed"]
    assert steps == [6, 7]  # keep_last=2 pruned 2 and 4 after newer commits

    model2, opt2 = _model_and_opt(1)
    with spotrun.Checkpointer(run_url, model=model2, optimizer=opt2, values={"epoch": 0},
                              handle_signals=False, watchers=[]) as ck2:
        assert ck2.restore() == 7
        assert ck2.values["epoch"] == 4
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])


def _two_checkpoints(run_url):
    model, opt = _model_and_opt(0)
    with spotrun.Checkpointer(run_url, model=model, optimizer=opt, every_steps=1, keep_last=5,
                              handle_signals=False, watchers=[]) as ck:
        ck.restore()
        _train(model, opt, 1)
        ck.step(1)
        first = {k: v.clone() for k, v in model.state_dict().items()}
        _train(model, opt, 1)
        ck.step(2)
    return first


def _damage(st: Storage, how: str) -> None:
    folder = checkpoint_dir(2)
    rel = f"{folder}/rank-00000.pt"
    data = st.read_bytes(rel)
    if how == "truncated":
        st.write_bytes(rel, data[: len(data) // 2])
    elif how == "flipped":
        i = len(data) // 2
        st.write_bytes(rel, data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
    elif how == "missing_manifest":
        st.remove(f"{folder}/{MANIFEST}")
    elif how == "garbled_manifest":
        st.write_bytes(f"{folder}/{MANIFEST}", b"{not json")


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing_manifest", "garbled_manifest"])
def test_damaged_newest_falls_back_with_warning(run_url, how, caplog):
    first = _two_checkpoints(run_url)
    st = Storage(run_url)
    _damage(st, how)
    model, opt = _model_and_opt(5)
    with caplog.at_level(logging.WARNING, logger="spotrun"):
        with spotrun.Checkpointer(run_url, model=model, optimizer=opt, handle_signals=False,
                                  watchers=[]) as ck:
            assert ck.restore() == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, first[k])
    if how != "missing_manifest":  # an uncommitted folder is skipped silently: it is no checkpoint
        assert any("step 2" in r.getMessage() for r in caplog.records)
    info = find_latest_valid(st)
    assert info is not None and info.step == 1
