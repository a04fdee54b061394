"""ResumableLoader: resumed mid-epoch, it yields exactly the remaining batches, reading none twice."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from spotrun import ResumableLoader


class CountingDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.reads += 1
        return i


def _take(it, k):
    return [next(it).tolist() for _ in range(k)]


def test_resume_mid_epoch_same_order_no_rereads():
    full = ResumableLoader(CountingDataset(50), batch_size=4, seed=3)
    reference = _take(full.forever(), 30)  # crosses two epoch boundaries (13 batches/epoch)

    first = ResumableLoader(CountingDataset(50), batch_size=4, seed=3)
    head = _take(first.forever(), 17)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 4

    ds = CountingDataset(50)
    second = ResumableLoader(ds, batch_size=4, seed=3)
    second.load_state_dict(state)
    tail = _take(second.forever(), 13)
    assert head + tail == reference
    assert ds.reads == sum(len(b) for b in tail)  # consumed batches were never read again


def test_epochs_differ_and_do_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = ResumableLoader(CountingDataset(20), batch_size=5, seed=1)
    e0 = [b.tolist() for b in loader]
    e1 = [b.tolist() for b in loader]
    assert e0 != e1 and sorted(sum(e0, [])) == list(range(20))
    assert torch.equal(before, torch.get_rng_state())


def test_seed_mismatch_is_refused():
    a = ResumableLoader(CountingDataset(10), batch_size=2, seed=1)
    b = ResumableLoader(CountingDataset(10), batch_size=2, seed=2)
    try:
        b.load_state_dict(a.state_dict())
    except ValueError as exc:
        assert "seed 1" in str(exc)
    else:
        raise AssertionError("expected ValueError")
