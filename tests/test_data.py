"""ResumableLoader: resumed mid-epoch, it yields exactly the remaining batches, reading none twice."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset

from spotrun import ResumableLoader
from spotrun.checkpoint.data import EpochSampler, rank_seed
from spotrun.errors import ConfigError


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
    assert e0 != e1 and sorted(i for batch in e0 for i in batch) == list(range(20))
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


# -- rank sharding: one global order, a global position, resumable on any number of ranks --

def _order(n: int, seed: int, epoch: int) -> list[int]:
    return EpochSampler(n, seed=seed, epoch=epoch, shuffle=True, start=0).order().tolist()


def _ranks(n, batch_size, world, *, seed=5, drop_last=False, state=None):
    """``world`` loaders as ``world`` DDP ranks would hold them, all loaded with ``state``."""
    loaders = [ResumableLoader(CountingDataset(n), batch_size, seed=seed, drop_last=drop_last,
                               rank=r, world_size=world) for r in range(world)]
    if state is not None:
        for loader in loaders:  # ranks with no state of their own get rank 0's copy
            loader.load_state_dict(state)
    return loaders


def _run_plan(n, plan, *, seed=5, drop_last=False):
    """Train in segments ``(world, batch_size, steps)``, each resumed from the last one's state.

    Returns {epoch: [(positions step by step)]}: for each step, every rank's batch in rank order,
    and checks on every step that all ranks are in the same state (lockstep, global position).
    """
    steps_by_epoch: dict[int, list[list[int]]] = {}
    state = None
    for world, batch_size, steps in plan:
        loaders = _ranks(n, batch_size, world, seed=seed, drop_last=drop_last, state=state)
        its = [loader.forever() for loader in loaders]
        for _ in range(steps):
            batches = [next(it).tolist() for it in its]
            states = [loader.state_dict() for loader in loaders]
            assert all(s == states[0] for s in states), states
            assert len({len(b) for b in batches}) == 1, batches  # same batch on every rank
            steps_by_epoch.setdefault(loaders[0].epoch, []).append(batches)
        state = loaders[0].state_dict()
    return steps_by_epoch


def _consumed(steps: list[list[list[int]]]) -> list[int]:
    return [i for batches in steps for b in batches for i in b]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_read_disjoint_parts_of_one_global_order(world):
    n, bs = 48, 3
    loaders = _ranks(n, bs, world)
    epoch = [[b.tolist() for b in loader] for loader in loaders]
    assert [len(e) for e in epoch] == [len(loader) for loader in loaders]
    assert [len(e) for e in epoch] == [n // world // bs] * world
    per_rank = [{i for b in e for i in b} for e in epoch]
    assert sum(len(s) for s in per_rank) == n and set().union(*per_rank) == set(range(n))
    # Step by step, the ranks together read the next world * batch_size samples of the
    # single-process order for (seed, epoch 0).
    order = _order(n, 5, 0)
    for k in range(len(epoch[0])):
        step = sorted(i for e in epoch for i in e[k])
        assert step == sorted(order[k * world * bs : (k + 1) * world * bs])
    assert all(loader.epoch == 1 for loader in loaders)


def test_state_is_global_and_identical_on_every_rank():
    n, bs, world = 40, 3, 4
    loaders = _ranks(n, bs, world)
    its = [loader.forever() for loader in loaders]
    for k in range(1, 6):
        for it in its:
            next(it)
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states)
        expect = {"epoch": 0, "batch_in_epoch": k, "seed": 5, "position": min(n, k * world * bs)}
        if k == 5:  # 4 steps of 12 end epoch 0 (40 samples); the 5th is epoch 1's first
            expect = {"epoch": 1, "batch_in_epoch": 1, "seed": 5, "position": world * bs}
        assert states[0] == expect


@pytest.mark.parametrize("world", [3, 4])
def test_remainder_padded_without_drop_last(world):
    n, bs = 50, 4
    loaders = _ranks(n, bs, world)
    epoch = [[b.tolist() for b in loader] for loader in loaders]
    lengths = {len(e) for e in epoch}
    assert lengths == {len(loaders[0])}  # same number of batches on every rank
    counts = Counter(i for e in epoch for b in e for i in b)
    assert set(counts) == set(range(n))  # every sample read
    pad = -n % world
    repeated = sorted(i for i, c in counts.items() if c > 1)
    assert all(c <= 2 for c in counts.values())
    assert repeated == sorted(_order(n, 5, 0)[:pad])  # the epoch's first samples, as documented
    assert sum(len(b) for e in epoch for b in e) == n + pad


@pytest.mark.parametrize("world", [3, 4])
def test_remainder_dropped_with_drop_last(world):
    n, bs = 50, 4
    loaders = _ranks(n, bs, world, drop_last=True)
    epoch = [[b.tolist() for b in loader] for loader in loaders]
    assert {len(e) for e in epoch} == {len(loaders[0])} == {n // (world * bs)}
    assert all(len(b) == bs for e in epoch for b in e)  # only full batches
    read = [i for e in epoch for b in e for i in b]
    assert len(read) == len(set(read)) == n // (world * bs) * world * bs
    assert set(read) == set(_order(n, 5, 0)[: len(read)])  # the tail of the order is what drops


PLANS = {
    "4->2": [(4, 12, 7), (2, 12, 30)],
    "2->4": [(2, 12, 13), (4, 12, 12)],
    "4->3": [(4, 12, 3), (3, 12, 20)],
    "1->4->2->3": [(1, 12, 9), (4, 12, 4), (2, 12, 11), (3, 12, 9)],
    "4->2 same global batch": [(4, 12, 8), (2, 24, 12)],
}


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_resume_on_another_world_size_reads_each_sample_once(plan):
    # 240 samples in batches of 12 leave, from any resume point, a rest that 1..4 ranks split
    # evenly: no padding, so every epoch must read every sample exactly once.
    n = 240
    resumed = _run_plan(n, plan)
    world, bs, _ = plan[0]
    total = sum(w * b * s for w, b, s in plan)
    uninterrupted = _run_plan(n, [(world, bs, -(-total // (world * bs)))])
    complete = [e for e in resumed if e + 1 in resumed]
    assert len(complete) >= 2 and 0 in complete  # the resumes land in several epochs
    for e in complete:
        assert Counter(_consumed(resumed[e])) == Counter(_consumed(uninterrupted[e]))
        assert Counter(_consumed(resumed[e])) == Counter(range(n))
        # Not just the same set: step after step, the ranks read the next samples of the
        # epoch's one global order, whatever the world size was.
        order, at = _order(n, 5, e), 0
        for batches in resumed[e]:
            got = sorted(i for b in batches for i in b)
            assert got == sorted(order[at : at + len(got)])
            at += len(got)
        assert at == n


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_on_another_world_size_follows_the_remainder_rule(drop_last):
    n = 50  # does not split evenly: the rule of the world size that ends each epoch applies
    resumed = _run_plan(n, [(4, 3, 3), (3, 3, 9), (2, 3, 8)], drop_last=drop_last)
    for e in [e for e in resumed if e + 1 in resumed]:
        counts = Counter(_consumed(resumed[e]))
        order = _order(n, 5, e)
        if drop_last:  # each read at most once; what is missing is the end of the order
            assert max(counts.values()) == 1
            assert sorted(counts) == sorted(order[: len(counts)])
            assert n - len(counts) < 3 * 3
        else:  # each read at least once; repeats are the epoch's first few, fewer than the ranks
            assert set(counts) == set(range(n))
            repeats = sorted(i for i, c in counts.items() if c > 1)
            assert max(counts.values()) <= 2 and len(repeats) < 4
            assert repeats == sorted(order[: len(repeats)])


def test_state_dict_without_position_loads_as_one_process():
    # What spotrun saved before positions were global: epoch 1, 4 batches of 4 into it.
    reference = _take(ResumableLoader(CountingDataset(50), batch_size=4, seed=3).forever(), 30)
    old = ResumableLoader(CountingDataset(50), batch_size=4, seed=3)
    old.load_state_dict({"epoch": 1, "batch_in_epoch": 4, "seed": 3})
    assert old.state_dict()["position"] == 16
    assert _take(old.forever(), 13) == reference[17:]


def test_one_process_is_rank_0_of_1_and_unchanged():
    default = ResumableLoader(CountingDataset(23), batch_size=4, seed=9)
    explicit = ResumableLoader(CountingDataset(23), batch_size=4, seed=9, rank=0, world_size=1)
    assert (default.rank, default.world_size) == (0, 1)
    assert _take(default.forever(), 15) == _take(explicit.forever(), 15)
    assert default.state_dict() == explicit.state_dict()
    assert default.state_dict()["position"] == default.state_dict()["batch_in_epoch"] * 4
    first = [i for b in _take(ResumableLoader(CountingDataset(23), 4, seed=9).forever(), 6)
             for i in b]
    assert first == _order(23, 9, 0)  # the EpochSampler order, read straight through


def test_sharded_iteration_does_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for loader in _ranks(30, 4, 3):
        list(loader)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("rank,world", [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank_or_world_size_is_refused(rank, world):
    with pytest.raises(ConfigError, match="ResumableLoader"):
        ResumableLoader(CountingDataset(10), batch_size=2, rank=rank, world_size=world)


def test_rank_seed_is_deterministic_and_distinct():
    assert rank_seed(7, 3, 120) == rank_seed(7, 3, 120)
    seeds = {rank_seed(7, r, s) for r in range(8) for s in (0, 10, 120)}
    assert len(seeds) == 24 and all(0 <= s < 2**63 for s in seeds)


# -- peeking (issue 11 item 7): a batch counts as consumed once it was used --------------

def _epochs(loader, k, peek=False):
    out = []
    for _ in range(k):
        if peek:
            assert len(next(iter(loader))) == 4  # the README-style peek at a batch's size
        out.append([b.tolist() for b in loader])
    return out


def test_a_peek_does_not_drop_a_batch():
    reference = _epochs(ResumableLoader(CountingDataset(40), batch_size=4, seed=2), 3)
    peeked = _epochs(ResumableLoader(CountingDataset(40), batch_size=4, seed=2), 3, peek=True)
    assert peeked == reference  # before: every epoch lost its first batch
    assert all(len(e) == 10 for e in peeked)


def test_break_gives_back_an_unused_batch_and_keeps_used_ones():
    loader = ResumableLoader(CountingDataset(20), batch_size=2, shuffle=False)
    first = []
    for b in loader:
        if len(first) == 3:
            break  # b was fetched but not used
        first.append(b.tolist())
    rest = [b.tolist() for b in loader]
    assert first + rest == [[i, i + 1] for i in range(0, 20, 2)]
    # mark_consumed (a Checkpointer step) says the last batch handed out was used
    loader = ResumableLoader(CountingDataset(20), batch_size=2, shuffle=False)
    it = iter(loader)
    assert next(it).tolist() == [0, 1]
    loader.mark_consumed()
    assert next(iter(loader)).tolist() == [2, 3]


def test_a_replaced_iterator_refuses_to_go_on():
    loader = ResumableLoader(CountingDataset(20), batch_size=2, shuffle=False)
    old = iter(loader)
    next(old)
    next(old)
    fresh = iter(loader)
    with pytest.raises(RuntimeError, match="replaced by a newer iter"):
        next(old)
    assert next(fresh).tolist() == [2, 3]  # the first batch was used (the loop came back)


def _peeking_run(url, total, stop_at=None):
    """An epoch loop that peeks at the start of every epoch, as the issue's script did."""
    import spotrun

    loader = ResumableLoader(CountingDataset(24), batch_size=4, seed=1)
    seen = []
    ck = spotrun.Checkpointer(url, data=loader, watchers=[], handle_signals=False,
                              every_steps=100).start()
    step = ck.restore()
    try:
        while step < total:
            _ = len(next(iter(loader)))
            for b in loader:
                seen.append(b.tolist())
                step += 1
                if step == stop_at:
                    ck.request_stop()
                ck.step(step)
                if step == total:
                    break
        ck.finish()
    except SystemExit:
        ck.close()
        raise
    ck.close()
    return seen


def test_peeks_with_a_checkpointer_resume_exactly(tmp_path):
    plain = _epochs(ResumableLoader(CountingDataset(24), batch_size=4, seed=1), 3)
    reference = _peeking_run(str(tmp_path / "ref"), 16)
    assert reference == [b for e in plain for b in e][:16]
    url = str(tmp_path / "run")
    with pytest.raises(SystemExit):
        _peeking_run(url, 16, stop_at=9)
    tail = _peeking_run(url, 16)
    assert len(tail) == 7 and reference[9:] == tail
