"""Sharded restore in one process: the torch.save items decoded over the verified bytes
(format/tensorfile.py) and non-tensor values loaded safely (weights_only) before DCP's
planner sees them."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from spotrun.errors import CheckpointError, CorruptCheckpointError
from spotrun.format.commit import commit
from spotrun.format.manifest import Manifest
from spotrun.format.sharded import read_sharded, write_sharded
from spotrun.format.tensorfile import tensor_in, value_in
from spotrun.storage import Storage


def _saved(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


@pytest.mark.parametrize("tensor", [
    torch.arange(12.0).reshape(3, 4),
    torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous strides
    torch.arange(12.0)[2:],  # a view: torch.save keeps the whole storage and an offset
    torch.tensor(3.0),  # 0-dim (AdamW's step)
    torch.zeros(0),
    torch.arange(10, dtype=torch.bfloat16),
    torch.tensor([True, False, True]),
    torch.randn(3, 2, dtype=torch.complex64),
    torch.arange(7, dtype=torch.int64),
], ids=["2d", "transposed", "view", "scalar", "empty", "bf16", "bool", "complex", "int64"])
def test_tensor_in_equals_torch_load_anywhere_in_a_buffer(tensor):
    raw = _saved(tensor)
    buf = bytearray(b"\x00" * 13 + raw + b"\xff" * 5)
    got = tensor_in(memoryview(buf)[13:13 + len(raw)])
    want = torch.load(io.BytesIO(raw), weights_only=True)
    assert got is not None
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got, want)
    if tensor.numel():  # over the buffer's own bytes, not a copy of them
        base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
        assert base + 13 < got.data_ptr() < base + 13 + len(raw)


def test_tensor_in_declines_what_it_does_not_know():
    raw = _saved(torch.arange(64.0))
    assert tensor_in(memoryview(raw[:-7])) is None  # truncated: no end of directory
    assert tensor_in(memoryview(b"not a zip at all, not at all" * 3)) is None
    two = io.BytesIO()
    base = torch.arange(8.0)
    torch.save([base[:4], base[4:]], two)  # not one tensor
    assert tensor_in(memoryview(two.getvalue())) is None
    assert tensor_in(memoryview(_saved(torch.arange(3.0)))) is not None


def _write(url: str, state: dict, step: int = 7) -> tuple[Storage, Manifest]:
    storage = Storage(url)
    manifest = Manifest(step=step, files=dict(write_sharded(storage, step, state)))
    commit(storage, manifest)
    return storage, manifest


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_non_tensor_value_that_runs_code_is_refused(tmp_path: Path):
    """DCP's planner unpickles non-tensor values with weights_only=False; the reader loads
    them safely first, so a checkpoint (checksums and all) that names code runs none."""
    pwned = tmp_path / "pwned"
    storage, manifest = _write(str(tmp_path / "run"),
                               {"model": {"w": torch.ones(3)}, "optim": {"x": _Evil(str(pwned))}})
    target = {"model": {"w": torch.zeros(3)}, "optim": {"x": None}}
    with pytest.raises(CheckpointError, match="weights_only=True.*refused") as info:
        read_sharded(storage, manifest, target)
    assert not isinstance(info.value, CorruptCheckpointError)  # not damage: no fallback
    assert not pwned.exists()


def test_plain_values_and_tensors_round_trip_through_the_safe_load(tmp_path: Path):
    state = {"model": {"w": torch.randn(4, 3)},
             "optim": {"lr": 0.25, "betas": (0.9, 0.99), "flag": None, "name": "adamw",
                       "step": torch.tensor(12.0)}}
    storage, manifest = _write(str(tmp_path / "run"), state)
    target = {"model": {"w": torch.zeros(4, 3)},
              "optim": {"lr": 0.0, "betas": (0.0, 0.0), "flag": 1, "name": "",
                        "step": torch.tensor(0.0)}}
    read_sharded(storage, manifest, target)
    assert torch.equal(target["model"]["w"], state["model"]["w"])
    assert {k: v for k, v in target["optim"].items() if k != "step"} == \
        {k: v for k, v in state["optim"].items() if k != "step"}
    assert torch.equal(target["optim"]["step"], state["optim"]["step"])


@pytest.mark.parametrize("value", [0.25, (0.9, 0.999), None, True, "adamw", {"a": [1, 2.5]}, 7])
def test_value_in_equals_a_weights_only_load(value):
    buf = io.BytesIO()
    torch.save(value, buf)
    assert value_in(memoryview(buf.getvalue())) == (True, torch.load(io.BytesIO(buf.getvalue()),
                                                                      weights_only=True))


def test_value_in_leaves_tensors_to_torch_load_and_refuses_code(tmp_path: Path):
    buf = io.BytesIO()
    torch.save({"t": torch.ones(2)}, buf)
    assert value_in(memoryview(buf.getvalue())) == (False, None)
    buf = io.BytesIO()
    torch.save(_Evil(str(tmp_path / "pwned")), buf)
    with pytest.raises(pickle.UnpicklingError):
        value_in(memoryview(buf.getvalue()))
    assert not (tmp_path / "pwned").exists()
