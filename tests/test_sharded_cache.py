"""The sharded save's cached state (issue 24): ``get_state_dict`` runs on the first save only,
and every later save is still exactly the state at that step, including when tensors are
replaced, added or reshaped between saves (the cache must notice and rebuild). One process,
``sharded=True``; the multi-rank paths are in test_sharded.py / test_sharded_checkpointer.py."""

from __future__ import annotations

import torch

import spotrun
from spotrun.format.commit import read_manifest
from spotrun.format.sharded import ShardedSaver, get_state, read_full
from spotrun.storage import Storage


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """What the checkpoint must hold: a deep copy of get_state_dict's state, now."""
    state = get_state(model, opt)
    return {
        "model": {k: v.detach().clone() for k, v in state["model"].items()},
        "state": {fqn: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                  for fqn, s in state["optim"]["state"].items()},
        "lr": [g["lr"] for g in state["optim"]["param_groups"]],
    }


def _assert_checkpoint_is(storage: Storage, step: int, expected: dict) -> None:
    saved = read_full(storage, read_manifest(storage, step))
    assert set(saved["model"]) == set(expected["model"])
    for k, v in expected["model"].items():
        assert torch.equal(saved["model"][k], v), (step, k)
    for fqn, s in expected["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(saved["optim"]["state"][fqn][k]),
                               torch.as_tensor(v)), (step, fqn, k)
    assert [g["lr"] for g in saved["optim"]["param_groups"]] == expected["lr"]


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched) -> None:
    model(torch.randn(8, 6)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_cached_state_follows_values_and_rebuilds_on_changed_tensors(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5),
                                torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    url = str(tmp_path / "run")
    storage = Storage(url)
    with spotrun.Checkpointer(url, model=model, optimizer=opt, sharded=True, keep_last=10,
                              watchers=[], handle_signals=False) as ck:
        saver = ck._sharded_saver
        assert isinstance(saver, ShardedSaver)

        def save(step: int) -> dict:
            expected = _snapshot(model, opt)
            ck.steps_done = step
            ck.save()
            ck.wait()
            return expected

        _train_step(model, opt, sched)
        expected = {1: save(1)}
        _train_step(model, opt, sched)  # new values, new lr: same tensors, so no rebuild
        expected[2] = save(2)
        assert saver._live.builds == 1
        assert saver._plan is not None and saver._plan.source is saver._live.state

        # Replaced tensors (same shapes) and a new buffer: the cache must rebuild.
        model[1].running_mean = torch.full((5,), 7.0)
        with torch.no_grad():
            model[0].weight.data = torch.randn(5, 6)
        model.register_buffer("extra", torch.arange(6.0).reshape(2, 3))
        expected[3] = save(3)
        assert saver._live.builds == 2
        # A buffer replaced by one of another shape.
        model.extra = torch.ones(4, 4)
        _train_step(model, opt, sched)
        expected[4] = save(4)
        assert saver._live.builds == 3
        _train_step(model, opt, sched)
        expected[5] = save(5)
        assert saver._live.builds == 3

    for step, exp in expected.items():
        _assert_checkpoint_is(storage, step, exp)
    assert torch.equal(read_full(storage, read_manifest(storage, 5))["model"]["extra"],
                       torch.ones(4, 4))


def test_stage_of_a_state_not_from_the_cache_walks_it_each_time(tmp_path):
    # A caller's own dict, mutated in place between stages, must never go down the plan.
    saver = ShardedSaver(Storage(str(tmp_path / "run")))
    try:
        state = {"model": {"w": torch.zeros(4)}}
        saver.stage(state)
        state["model"]["w"] = torch.ones(4)  # a new tensor under the same key
        assert torch.equal(saver.stage(state)["model"]["w"], torch.ones(4))
        assert saver._plan is None
    finally:
        saver.close()


def test_save_after_restore_carries_the_lr_the_scheduler_sets(tmp_path):
    # restore() loads into the cached state, then optimizer.load_state_dict replaces the
    # optimizer's param_groups with new dicts: the next save must read the lr from those
    # (found by check-resume: a resumed run saved the lr of the restore, not the current one).
    url = str(tmp_path / "run")

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.1)

    model, opt, sched = build()
    with spotrun.Checkpointer(url, model=model, optimizer=opt, scheduler=sched, sharded=True,
                              keep_last=10, watchers=[], handle_signals=False) as ck:
        _train_step(model, opt, sched)
        ck.steps_done = 1
        ck.save()
    model, opt, sched = build()
    with spotrun.Checkpointer(url, model=model, optimizer=opt, scheduler=sched, sharded=True,
                              keep_last=10, watchers=[], handle_signals=False) as ck:
        assert ck.restore() == 1
        _train_step(model, opt, sched)
        ck.steps_done = 2
        ck.save()
        ck.wait()
        lr = opt.param_groups[0]["lr"]
    storage = Storage(url)
    saved = read_full(storage, read_manifest(storage, 2))
    assert [g["lr"] for g in saved["optim"]["param_groups"]] == [lr]
    assert abs(lr - 1e-4) < 1e-12
