"""A sharded (FSDP2) restore agrees between ranks once per checkpoint tried, and still
takes every decision together: a shard damaged on one rank moves every rank to the older
checkpoint (bit for bit), an error on one rank stops every rank with a clear message, and
nothing waits forever. One torchrun launch (2 gloo ranks) runs every case; each test below
asserts on its part of the output.

Collectives are counted on :class:`spotrun.distributed.Group` and on
``torch.distributed`` itself, so the counts cover DCP and the Checkpointer alike.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from helpers import REPO, finish_session, torchrun

TIMEOUT = 300  # 2 CPU ranks on a loaded machine; a hang must still end the test

SCRIPT = textwrap.dedent('''
    import json, os, sys, logging
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import spotrun
    from spotrun.distributed import Group
    from spotrun.errors import CheckpointError

    logging.getLogger("spotrun").setLevel(logging.ERROR)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    url = sys.argv[1]

    def build(seed, width=16):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, width))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt

    def train(model, opt):
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        opt.zero_grad()

    def local(model, opt):
        out = {}
        for n, p in model.named_parameters():
            out[n] = p.to_local().detach().clone()
        for i, st in enumerate(opt.state.values()):
            for k, v in st.items():
                t = v.to_local() if hasattr(v, "to_local") else v
                out[f"opt{i}.{k}"] = t.detach().clone()
        return out

    def same(a, b):
        return sorted(a) == sorted(b) and all(
            a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    def ckpt(model, opt):
        return spotrun.Checkpointer(url, model=model, optimizer=opt, every_steps=10**9,
                                    keep_last=3, watchers=[], handle_signals=False)

    counts = {}
    def counting(owner, name):
        f = getattr(owner, name)
        key = ("dist." if owner is dist else "") + name
        def g(*a, **k):
            counts[key] = counts.get(key, 0) + 1
            return f(*a, **k)
        setattr(owner, name, g)
    for name in ("all_gather_ints", "all_gather", "gather", "broadcast", "barrier"):
        if hasattr(Group, name):
            counting(Group, name)
    for name in ("all_gather_object", "gather_object", "broadcast_object_list", "barrier",
                 "all_reduce", "all_gather", "broadcast", "gather", "scatter"):
        counting(dist, name)

    def restore_counting(ck):
        counts.clear()
        step = ck.restore()
        return step, dict(counts)

    report = {"rank": rank}
    # Two checkpoints: step 1 and step 2 (different values).
    model, opt = build(0)
    train(model, opt)
    with ckpt(model, opt) as ck:
        ck.steps_done = 1; ck.save(); ck.wait()
        saved1 = local(model, opt)
        train(model, opt)
        counts.clear()
        ck.steps_done = 2; ck.save()
        report["save_counts"] = dict(counts)  # nothing was in flight: no collective
        ck.wait()
        saved2 = local(model, opt)
    dist.barrier()

    # 1) A clean restore into a freshly built model (other values): the newest, bit for bit.
    model, opt = build(1)
    train(model, opt)
    with ckpt(model, opt) as ck:
        step, report["clean_counts"] = restore_counting(ck)
    report["clean_step"] = step
    report["clean_exact"] = same(local(model, opt), saved2)
    dist.barrier()

    # 2) Rank 1's shard file of step 2 damaged: every rank falls back to step 1 together.
    if rank == 0:
        path = os.path.join(url, "000000000002", "__1_0.distcp")
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    model, opt = build(2)
    train(model, opt)
    with ckpt(model, opt) as ck:
        step, report["damaged_counts"] = restore_counting(ck)
    report["damaged_step"] = step
    report["damaged_exact"] = same(local(model, opt), saved1)
    report["quarantined"] = not os.path.exists(os.path.join(url, "000000000002"))
    dist.barrier()

    # 3) Rank 1's model does not fit the checkpoint (another width): an error there, so
    # every rank raises, rank 0 naming rank 1's problem; nobody is left in a collective.
    # (No training step: FSDP2's forward would all-gather shards of different sizes.)
    model, opt = build(3, width=16 if rank == 0 else 24)
    ck = ckpt(model, opt)
    ck.__enter__()
    try:
        ck.restore()
        report["error"] = None
    except CheckpointError as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    ck.__exit__(None, None, None)
    dist.barrier()

    # 4) A rank's background write starts nothing (DCP planning, serialising, checksums)
    # until every rank has staged: rank 1 saves 1.5 s late, and rank 0's write must not
    # begin before rank 1's save was even called. Its own folder: 1-3 above are untouched.
    import time
    import spotrun.format.sharded as sharded_mod
    real_write, started = sharded_mod._write_planned, []
    def write_planned(*a, **k):
        started.append(time.time())
        return real_write(*a, **k)
    sharded_mod._write_planned = write_planned
    model, opt = build(4)
    train(model, opt)
    with spotrun.Checkpointer(url + "-late", model=model, optimizer=opt, every_steps=10**9,
                              watchers=[], handle_signals=False) as ck:
        if rank == 1:
            time.sleep(1.5)
        report["save_called_at"] = time.time()
        ck.steps_done = 1; ck.save(); ck.wait()
        # 5) The next save of the same layout reuses DCP's save plan (no planning round).
        train(model, opt)
        ck.steps_done = 2; ck.save(); ck.wait()
        report["plans_made"] = ck._sharded_saver.plans_made
    sharded_mod._write_planned = real_write
    report["write_started_at"] = started[0] if started else None
    dist.barrier()
    # One file per rank: two ranks printing at once interleave their lines.
    with open(os.path.join(os.path.dirname(url), f"report-{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
''')


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, warm_ranks) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("agreement")
    script = tmp / "agreement.py"
    script.write_text(SCRIPT)
    env = _env()
    env["SPOTRUN_LOCAL_DIR"] = "off"  # the run URL alone: the damaged file is the one read
    env.setdefault("OMP_NUM_THREADS", "1")
    # The ranks are forks of ``warm_ranks``: the script's patches of torch.distributed (its
    # collective counts) stay in each fork, as in a process of its own.
    code, out = finish_session(torchrun(str(script), 2, str(tmp / "run"), env=env, wrapper=False,
                                        warm=warm_ranks), TIMEOUT)
    assert code == 0, out[-6000:]
    found = {}
    for rank in (0, 1):
        path = tmp / f"report-{rank}.json"
        assert path.exists(), out[-6000:]
        found[rank] = json.loads(path.read_text())
    return found


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_clean_restore_is_exact_and_agrees_once(reports):
    for rank, r in reports.items():
        assert r["clean_step"] == 2
        assert r["clean_exact"], f"rank {rank}: the restored shards differ from the saved ones"
        counts = r["clean_counts"]
        # The listing (rank 0's broadcast) and one agreement (one tensor all-gather): no
        # gather, no barrier, no per-phase rounds, no DCP planning collectives.
        assert counts.get("all_gather_ints") == 1, counts
        assert counts.get("broadcast") == 1, counts
        assert counts.get("dist.all_gather") == 1, counts
        for name in ("gather", "all_gather", "barrier", "dist.all_gather_object",
                     "dist.gather_object", "dist.gather", "dist.scatter", "dist.all_reduce",
                     "dist.barrier"):
            assert not counts.get(name), (name, counts)


def test_a_ranks_background_write_waits_until_every_rank_has_staged(reports):
    # Where ranks share cores, a write started early (DCP planning, serialising, checksums)
    # took CPU from ranks still copying and doubled the slowest rank's stall (issue 24).
    started, late = reports[0]["write_started_at"], reports[1]["save_called_at"]
    assert started is not None, reports[0]
    assert started >= late, f"rank 0 began writing {late - started:.2f}s before rank 1 staged"


def test_a_second_save_of_the_same_layout_reuses_the_save_plan(reports):
    # (Its restore stays exact: tests/test_sharded.py changes the layout between saves.)
    for rank, r in reports.items():
        assert r["plans_made"] == 1, (rank, r["plans_made"])


def test_a_save_with_nothing_in_flight_runs_no_collective_in_the_training_thread(reports):
    # Its stall is the copy: no barrier waiting for the slowest rank (DCP's collectives run
    # on the saver's own group, in the background thread, after save() has returned).
    for r in reports.values():
        assert not r["save_counts"].get("barrier"), r["save_counts"]
        assert not r["save_counts"].get("dist.barrier"), r["save_counts"]


def test_damaged_shard_on_one_rank_moves_every_rank_to_the_older_checkpoint(reports):
    for rank, r in reports.items():
        assert r["damaged_step"] == 1, r
        assert r["damaged_exact"], f"rank {rank}: not step 1's state bit for bit"
        assert r["quarantined"]
        counts = r["damaged_counts"]
        # One agreement per checkpoint tried, the messages gathered once (step 2 failed),
        # and the barrier that keeps the damaged folder out of the way before any save.
        assert counts.get("all_gather_ints") == 2, counts
        assert counts.get("all_gather") == 1, counts
        assert counts.get("barrier") == 1, counts


def test_an_error_on_one_rank_stops_every_rank_with_its_message(reports):
    err0, err1 = reports[0]["error"], reports[1]["error"]
    assert err0 is not None and err1 is not None, reports
    # Rank 0 loaded its part fine; it still stops, and says which rank failed and why.
    assert "rank 1" in err0 and "mismatch" in err0, err0
    assert "IncompatibleCheckpointError" in err1 and "mismatch" in err1, err1
