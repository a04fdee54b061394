"""A fresh optimizer's state made from a sharded checkpoint's DCP index (spotrun.format.
optim_init) instead of torch's zero-gradient optimizer step: one process, plain tensors
(fast). The FSDP2 cases, resharded over real gloo ranks, are in test_sharded.py and
test_sharded_checkpointer.py.

Each case loads one checkpoint twice into fresh objects, through torch's fake step and
through the state made from the index, and requires the two to end equal bit for bit
(values, dtypes, devices, key order), then to train on equally."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from optim_tools import RowScaled, counting_steps

import spotrun
from spotrun.errors import IncompatibleCheckpointError
from spotrun.format.commit import commit
from spotrun.format.manifest import Manifest
from spotrun.format.optim_init import init_optimizer_state
from spotrun.format.sharded import get_state, read_metadata, read_sharded, set_state, write_sharded
from spotrun.storage import Storage

Optims = Callable[[torch.nn.Module], list[torch.optim.Optimizer]]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3),
                                torch.nn.Linear(3, 2))
    model[3].bias.requires_grad_(False)  # frozen: the fake step gives it no state
    return model


def _adamw_groups(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    a, _, b, c = model
    return [torch.optim.AdamW([{"params": [a.weight, b.weight, c.bias], "weight_decay": 0.1},
                               {"params": [a.bias, b.bias], "weight_decay": 0.0, "lr": 3e-3},
                               {"params": [c.weight], "amsgrad": False}],
                              lr=1e-2, amsgrad=True)]


def _adam(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    return [torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False)]


def _sgd_momentum(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    return [torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, dampening=0.1,
                            weight_decay=0.01)]


def _mixed(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    a, _, b, c = model
    return [torch.optim.AdamW([a.weight, a.bias, c.bias], lr=1e-2),
            RowScaled([b.weight, c.weight]),  # a row-vector state: torch's step makes it
            torch.optim.SGD([b.bias], lr=1e-2, momentum=0.5)]


def _train(model: torch.nn.Module, optims: list[torch.optim.Optimizer], steps: int,
           seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(4, 6, generator=gen)).square().mean().backward()
        for optim in optims:
            optim.step()
            optim.zero_grad()


def _saved(tmp_path: Path, optims: Optims, step: int = 3) -> tuple[Storage, Manifest]:
    model = _model()
    opts = optims(model)
    _train(model, opts, step)
    storage = Storage(str(tmp_path / "run"))
    files = write_sharded(storage, step, get_state(model, opts))
    manifest = Manifest(step=step, files=dict(files))
    commit(storage, manifest)
    return storage, manifest


def _load(storage: Storage, manifest: Manifest, optims: Optims, *, made: bool
          ) -> tuple[torch.nn.Module, list[torch.optim.Optimizer], list[int], list[int]]:
    """Fresh objects loaded from the checkpoint: through the state made from the index
    (``made``) or through torch's fake step alone. Also: the indices of the optimizers given
    state from the index, and the optimizer steps each ran in the load."""
    torch.manual_seed(5)  # other initial weights than the saved ones
    model = _model()
    opts = optims(model)
    with counting_steps(opts) as steps:
        metadata = read_metadata(storage, manifest)
        given = init_optimizer_state(model, opts, metadata) if made else []
        state = get_state(model, opts)
        read_sharded(storage, manifest, state, metadata=metadata)
        set_state(model, opts, state)
    return model, opts, [opts.index(o) for o in given], steps


def _bytes(model: torch.nn.Module, optims: list[torch.optim.Optimizer]) -> bytes:
    """Everything a resumed run continues from, serialised: values, dtypes, devices and
    the order of every key (torch.save writes them all)."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optims": [o.state_dict() for o in optims]}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("optims,made", [
    (_adamw_groups, [0]),
    (_adam, [0]),
    (_sgd_momentum, [0]),
    (_mixed, [0, 2]),  # AdamW and SGD; RowScaled keeps the fake step
], ids=["adamw-groups-amsgrad-frozen", "adam", "sgd-momentum", "mixed"])
def test_state_from_the_index_loads_and_trains_as_after_the_fake_step(tmp_path: Path,
                                                                    optims: Optims,
                                                                    made: list[int]) -> None:
    storage, manifest = _saved(tmp_path, optims)
    old_model, old_opts, old_made, old_steps = _load(storage, manifest, optims, made=False)
    new_model, new_opts, new_made, new_steps = _load(storage, manifest, optims, made=True)
    assert old_made == [] and all(n >= 1 for n in old_steps)  # the fake step ran for each
    assert new_made == made
    assert [new_steps[i] for i in made] == [0] * len(made)  # and not for these
    assert _bytes(new_model, new_opts) == _bytes(old_model, old_opts)
    # The frozen parameter has no state either way; AdamW's step stays a CPU float32.
    frozen = new_model[3].bias
    assert all(frozen not in o.state for o in new_opts)
    if isinstance(new_opts[0], torch.optim.Adam):
        step = next(iter(new_opts[0].state.values()))["step"]
        assert step.dtype == torch.float32 and step.device.type == "cpu" and int(step) == 3
    _train(old_model, old_opts, 2, seed=7)
    _train(new_model, new_opts, 2, seed=7)
    assert _bytes(new_model, new_opts) == _bytes(old_model, old_opts)


def _rows(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    return [RowScaled(p for p in model.parameters() if p.dim() == 2)]


def _plain_sgd(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    return [torch.optim.SGD(model.parameters(), lr=1e-2, weight_decay=0.01)]


# Not combined with a stateful optimizer: torch's set_state_dict (strict) refuses a trainable
# parameter without saved state once any parameter has some, whichever way the state is made.
@pytest.mark.parametrize("optims", [_rows, _plain_sgd], ids=["row-vector-state", "plain-sgd"])
def test_state_shaped_otherwise_or_no_state_keeps_the_fake_step(tmp_path: Path,
                                                                optims: Optims) -> None:
    storage, manifest = _saved(tmp_path, optims)
    model, opts, made, steps = _load(storage, manifest, optims, made=True)
    assert made == [] and steps[0] >= 1  # torch's step made (or tried to make) the state
    if optims is _rows:
        assert opts[0].state[model[0].weight]["row"].shape == (5,)
    else:
        assert not opts[0].state
    old_model, old_opts, _, _ = _load(storage, manifest, optims, made=False)
    assert _bytes(model, opts) == _bytes(old_model, old_opts)
    _train(old_model, old_opts, 2, seed=7)
    _train(model, opts, 2, seed=7)
    assert _bytes(model, opts) == _bytes(old_model, old_opts)


def test_a_key_the_checkpoint_lacks_keeps_the_fake_step_and_its_error(tmp_path: Path) -> None:
    storage, manifest = _saved(tmp_path, _adam)  # no amsgrad: no max_exp_avg_sq saved

    def amsgrad(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)]

    model = _model()
    opts = amsgrad(model)
    assert init_optimizer_state(model, opts, read_metadata(storage, manifest)) == []
    assert not opts[0].state
    with pytest.raises(IncompatibleCheckpointError, match="max_exp_avg_sq"):
        _load(storage, manifest, amsgrad, made=True)


def test_another_shape_or_an_optimizer_with_state_or_grads_is_left_alone(tmp_path: Path) -> None:
    storage, manifest = _saved(tmp_path, _adam)
    metadata = read_metadata(storage, manifest)
    torch.manual_seed(0)
    wider = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3),
                                torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(wider.parameters())
    assert init_optimizer_state(wider, opt, metadata) == [] and not opt.state
    transposed = _model()
    transposed[3].weight = torch.nn.Parameter(torch.zeros(3, 2))  # as many elements
    opt = torch.optim.Adam(transposed.parameters())
    assert init_optimizer_state(transposed, opt, metadata) == [] and not opt.state

    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model[0].weight.grad = torch.ones_like(model[0].weight)  # torch's init skips it too
    assert init_optimizer_state(model, opt, metadata) == [] and not opt.state

    model[0].weight.grad = None
    _train(model, [opt], 1)
    before = {id(t) for st in opt.state.values() for t in st.values()}
    assert init_optimizer_state(model, opt, metadata) == []
    assert {id(t) for st in opt.state.values() for t in st.values()} == before


def _same_values(a: object, b: object) -> bool:
    """Equal tensors (dtype and values) and values, however the containers were built (a
    trained optimizer's param groups share one betas tuple, pickled once; loaded ones not)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_checkpointer_restore_runs_no_optimizer_step(tmp_path: Path, monkeypatch) -> None:
    """The Checkpointer's sharded restore (one process, ``sharded=True``) gives the fresh
    AdamW its state from the index: no optimizer step, the saved state exactly, and the
    same objects as a restore through torch's fake step."""
    url = str(tmp_path / "run")

    def run(steps: int) -> tuple[torch.nn.Module, list[torch.optim.Optimizer], int, list[int]]:
        model = _model()
        opts = _adamw_groups(model)
        with spotrun.Checkpointer(url, model=model, optimizer=opts[0], sharded=True,
                                  every_steps=2, watchers=[], handle_signals=False) as ck:
            with counting_steps(opts) as in_restore:
                start = ck.restore()
            gen = torch.Generator().manual_seed(start)
            for _ in ck.range(steps):
                model(torch.randn(4, 6, generator=gen)).square().mean().backward()
                opts[0].step()
                opts[0].zero_grad()
        return model, opts, start, in_restore

    trained, trained_opts, start, _ = run(4)
    assert start == 0
    model, opts, start, in_restore = run(0)
    assert start == 4 and in_restore == [0]
    assert _same_values(model.state_dict(), trained.state_dict())
    assert _same_values(opts[0].state_dict(), trained_opts[0].state_dict())
    from spotrun.format import optim_init

    monkeypatch.setattr(optim_init, "init_optimizer_state", lambda *a, **k: [])
    old_model, old_opts, start, in_restore = run(0)
    assert start == 4 and in_restore == [1]  # torch's zero-gradient step
    assert _bytes(model, opts) == _bytes(old_model, old_opts)
