"""What real loops need: step-local state in ``values`` (tensors, tuples), ``start()``/``close()``
without a ``with`` block (and the exit hook behind it), ``break`` out of ``range()`` followed by
``finish()``, epoch loops with end-of-epoch work."""

from __future__ import annotations

import json
import logging
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, env_for, spawn, wait_for_line

import spotrun
from spotrun.records.layout import DONE_MARKER, EXIT_FINISHED, EXIT_INTERRUPTED
from spotrun.records.lease import read_lease
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

EPOCH_LOOP = str(REPO / "examples" / "epoch_loop.py")


def _ckpt(url: str, **kw) -> spotrun.Checkpointer:
    kw.setdefault("watchers", [])
    kw.setdefault("handle_signals", False)
    return spotrun.Checkpointer(url, **kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes, so NaNs and -0.0 compare exactly."""
    return t.contiguous().view(-1).view(torch.uint8)


def _same(a, b) -> bool:
    """Equal in type and content, tensors bit for bit with dtype and shape."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _step_local_values() -> dict:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 8, generator=g)
    return {
        "batch": (torch.randint(0, 100, (4, 16), generator=g), torch.randint(0, 100, (4, 16), generator=g)),
        "hidden": (torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)),
        "transposed": base.t(),  # not contiguous
        "odd": (torch.tensor([float("nan"), -0.0, float("inf")]),
                torch.arange(5, dtype=torch.bfloat16), torch.tensor(True), torch.tensor(7)),
        "nested": {"t": (1, 2.5, "s", None, [torch.ones(2, dtype=torch.float16)]), 3: (b"raw",)},
        "ema": 0.25,
    }


@pytest.mark.parametrize("async_save", [True, False])
def test_values_round_trip_tensors_and_tuples_exactly(tmp_path, async_save):
    url = str(tmp_path / "run")
    saved = _step_local_values()
    with pytest.raises(SystemExit) as stop, \
            _ckpt(url, model=torch.nn.Linear(2, 2), values={"batch": None, "hidden": None},
                  async_save=async_save, every_steps=1000) as ck:
        for step in ck.range(5):
            ck.values.update(saved)
            if step == 2:
                ck.request_stop()  # the stop checkpoint at step 3 holds the values
    assert stop.value.code == EXIT_INTERRUPTED
    with _ckpt(url, model=torch.nn.Linear(2, 2), values={"batch": None, "hidden": None}) as ck:
        assert ck.restore() == 3
        for k, v in saved.items():
            assert _same(ck.values[k], v), (k, ck.values[k], v)
        assert isinstance(ck.values["batch"], tuple) and isinstance(ck.values["odd"], tuple)


def _prefetch_train(url: str, total: int, stop_at: int | None) -> dict:
    """nanoGPT's shape: the next batch is drawn (with the global RNG) before the optimizer
    step, so it belongs to the state. Saved as ``values["batch"]``, the resume is exact."""
    spotrun.seed_everything(0)
    data = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))

    def get_batch():
        ix = torch.randint(0, len(data) - 4, (4,))
        return data[ix], data[ix + 1]

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 8))
    # A hand-written update: torch.optim's first use imports torch._dynamo (seconds).
    ck = _ckpt(url, model=model, values={"batch": None}, every_steps=3).start()
    start = ck.restore()
    x, y = ck.values["batch"] if start else get_batch()
    try:
        for step in ck.range(total):
            loss = torch.nn.functional.mse_loss(model(x), y)
            x, y = get_batch()                 # prefetch, before the update
            ck.values["batch"] = (x, y)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
            if step + 1 == stop_at:
                ck.request_stop()
    except SystemExit:
        ck.close()  # in a script the exit hook does this; pytest's process goes on
        raise
    ck.close()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_prefetched_batch_in_values_resumes_exactly(tmp_path):
    reference = _prefetch_train(str(tmp_path / "ref"), 12, None)
    url = str(tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        _prefetch_train(url, 12, stop_at=7)
    assert stop.value.code == EXIT_INTERRUPTED
    resumed = _prefetch_train(url, 12, None)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert Storage(url).exists(DONE_MARKER)


def test_start_close_is_the_with_block(tmp_path):
    url = str(tmp_path / "run")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    ck = spotrun.Checkpointer(url, model=torch.nn.Linear(2, 2), watchers=[], every_steps=2).start()
    assert signal.getsignal(signal.SIGTERM) == ck._interrupts._on_signal
    held = read_lease(Storage(url))
    assert held is not None and held.released_at is None
    with pytest.raises(RuntimeError, match="already active"):
        ck.start()
    for _ in ck.range(3):
        pass
    ck.close()
    ck.close()  # idempotent
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    lease = read_lease(Storage(url))
    assert lease is not None and lease.released_at is not None
    assert Storage(url).exists(DONE_MARKER)
    with pytest.raises(RuntimeError, match=r"ckpt.start\(\)"):
        ck.step()
    ends = [r["reason"] for r in Ledger(Storage(url)).records() if r["event"] == "segment_ended"]
    assert ends == ["finished"]


def test_close_inside_except_records_the_failure(tmp_path):
    url = str(tmp_path / "run")
    ck = _ckpt(url, model=torch.nn.Linear(2, 2)).start()
    try:
        for _ in ck.range(3):
            raise ValueError("boom")
    except ValueError:
        ck.close()
    ends = [r["reason"] for r in Ledger(Storage(url)).records() if r["event"] == "segment_ended"]
    assert ends == ["failed"]


def test_break_then_finish_writes_done_and_counts_the_step(tmp_path):
    from spotrun.format.commit import find_latest_valid

    url = str(tmp_path / "run")
    with _ckpt(url, model=torch.nn.Linear(2, 2), every_steps=100) as ck:
        for step in ck.range(10):
            if step == 4:
                break  # after step 4's work: 5 steps done
        ck.finish()
    done = json.loads(Storage(url).read_bytes(DONE_MARKER))
    assert done["step"] == 5 and find_latest_valid(Storage(url)).step == 5
    # finish(steps_done=...) when the break came before the step's work
    url2 = str(tmp_path / "run2")
    with _ckpt(url2, model=torch.nn.Linear(2, 2), every_steps=100) as ck:
        for step in ck.range(10):
            if step == 4:
                break
        ck.finish(step)
    assert json.loads(Storage(url2).read_bytes(DONE_MARKER))["step"] == 4


def test_break_without_finish_warns_at_close(tmp_path, caplog):
    url = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="spotrun"), \
            _ckpt(url, model=torch.nn.Linear(2, 2), every_steps=100) as ck:
        for step in ck.range(10):
            if step == 3:
                break
    assert not Storage(url).exists(DONE_MARKER)
    warned = [r.getMessage() for r in caplog.records if "finish()" in r.getMessage()]
    assert len(warned) == 1 and "left ckpt.range() at step 3" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spotrun"):  # restore()/step() without finish()
        ck = _ckpt(str(tmp_path / "run2"), model=torch.nn.Linear(2, 2)).start()
        ck.restore()
        ck.step(1)
        ck.close()
    assert any("closed at step 1 without ckpt.finish()" in r.getMessage() for r in caplog.records)


def _final_state(url: str) -> dict:
    from spotrun.format.commit import find_latest_valid
    from spotrun.format.snapshot import read_payload

    info = find_latest_valid(Storage(url))
    payload = read_payload(Storage(url), info.step, "rank-00000.pt", info.manifest.files["rank-00000.pt"])
    return {"step": info.step, **payload["objects"]["model"], **payload["objects"]["optimizer"]["state"]}


@pytest.mark.slow
def test_epoch_loop_start_close_sigterm_resumes_bit_exact(tmp_path, monkeypatch):
    """examples/epoch_loop.py (start()/close(), restore()/step()/finish(), end-of-epoch
    validation and LR on plateau, a best-model artifact): SIGTERM in the middle, resume,
    and the run ends where an uninterrupted one does, artifact included."""
    ref_url, url = str(tmp_path / "ref"), str(tmp_path / "run")
    args = ["--epochs", "2", "--step-sleep", "0.05"]
    # The uninterrupted reference runs in this process (one torch start-up less).
    monkeypatch.setattr(sys, "argv", [EPOCH_LOOP, "--url", ref_url, "--epochs", "2"])
    runpy.run_path(EPOCH_LOOP, run_name="__main__")
    proc = spawn([EPOCH_LOOP, "--url", url, *args], env_for(url))
    wait_for_line(proc, "epoch 1:", timeout=180)  # into the second epoch: after end-of-epoch work
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out
    # The exit hook closed it: lease released, segment recorded as interrupted.
    assert read_lease(Storage(url)).released_at is not None
    stopped_at = _final_state(url)["step"]
    assert 32 <= stopped_at < 64, out
    (tmp_path / "run-best.pt").unlink()  # a fresh machine: the artifact comes from the checkpoint
    resumed = subprocess.run([sys.executable, EPOCH_LOOP, "--url", url, "--epochs", "2"],
                             env=env_for(url), capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == EXIT_FINISHED, resumed.stdout + resumed.stderr
    a, b = _final_state(ref_url), _final_state(url)
    assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    best = [torch.load(tmp_path / f"{r}-best.pt", weights_only=True) for r in ("ref", "run")]
    assert _same(best[0], best[1])  # the artifact, put back after the resume, went on as it should
    ends = [r["reason"] for r in Ledger(Storage(url)).records() if r["event"] == "segment_ended"]
    assert ends == ["interrupted", "finished"], ends


@pytest.mark.slow
def test_exit_hook_closes_after_an_uncaught_exception(tmp_path):
    """start() and no close(): an exception ends the script while step 3's save is in flight;
    the exit hook commits it, records 'failed', releases the lease, restores SIGTERM."""
    from spotrun.format.commit import find_latest_valid

    url = str(tmp_path / "run")
    script = str(REPO / "tests" / "scripts" / "start_close_train.py")
    proc = subprocess.run([sys.executable, script, "raise"], env=env_for(url),
                          capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "ValueError: boom" in out, out
    assert "installed: _on_signal" in out and "at exit: SIGTERM handler default" in out, out
    assert find_latest_valid(Storage(url)).step == 3, out
    assert read_lease(Storage(url)).released_at is not None
    ends = [r["reason"] for r in Ledger(Storage(url)).records() if r["event"] == "segment_ended"]
    assert ends == ["failed"], ends
