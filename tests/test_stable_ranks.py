"""Node ranks follow the cluster file's slots (spotrun.launch.ranks), with real rendezvous.

torchrun's c10d rendezvous numbers nodes by ``sorted((addr, pid, local_id))``: on the local
simulator (every node 127.0.0.1) by agent pid, so after a replacement the survivors (older
pids) took the low ranks and the replacement the last one, whatever slot it filled; a
survivor whose rank changed restored its new rank's shard from a peer instead of its own
local copy (BENCHMARKS.md, issue 22, "ranks follow the agents' pids").

- A real c10d rendezvous of three handlers in this process (a TCPStore on 127.0.0.1): ranks
  equal slots, whatever order the nodes came in. This is the test that fails when this
  torch's private rendezvous pieces change under the hook.
- One real 3-node run through ``spotrun launch --local`` (module fixture, shared by the
  assertions): node 0, the store's host, vanishes; after the replacement each node's rank is
  its slot, the survivors restore from their own local copies (0 bytes from peers and the run
  URL), the replacement reads only its own share, from its buddy.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import subprocess
import sys
import threading

import pytest
from helpers import REPO

from spotrun.launch import ranks
from spotrun.launch.node import ClusterSpec, node_argv
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

EXAMPLE = str(REPO / "examples" / "recovery_train.py")
STATE_MIB = 4
TIMEOUT = 420  # a 3-node run with one replacement on a loaded 2-core box; a hang would be forever


# -- the hook, in one process --------------------------------------------------------------------

def _rendezvous(slots: list[int | None], run_id: str, max_nodes: int | None = None) -> dict[int, int]:
    """A real c10d rendezvous of one handler per entry of ``slots`` (created in that order,
    each under :func:`ranks.install` of its slot), all on 127.0.0.1 in this process; the
    group rank each got, by its position in ``slots``."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
        RendezvousTimeout,
    )

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    handlers = []
    try:
        for slot in slots:
            ranks.install(slot)
            # A client of its own per node, as each agent has: a blocking get of one (the
            # master address, waited for) must not hold up another's rendezvous traffic.
            store = TCPStore("127.0.0.1", server.port, is_master=False, timeout=datetime.timedelta(seconds=60))
            backend = C10dRendezvousBackend(store, run_id)
            handlers.append(DynamicRendezvousHandler.from_backend(
                run_id, store, backend, len(slots), max_nodes or len(slots), local_addr="127.0.0.1",
                timeout=RendezvousTimeout(join=datetime.timedelta(seconds=60),
                                          last_call=datetime.timedelta(seconds=1))))
    finally:
        ranks.install(None)
    got: dict[int, int] = {}
    errors: list[BaseException] = []

    def join(i: int) -> None:
        try:
            got[i] = handlers[i].next_rendezvous().rank
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(len(slots))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for h in handlers:
        h.shutdown()
    assert not errors, errors
    assert len(got) == len(slots), f"rendezvous did not complete: {got}"
    return got


def test_c10d_rendezvous_numbers_nodes_by_slot_on_this_torch() -> None:
    # Created in slot order 2, 0, 1: torch alone numbers them 0, 1, 2 (same address and pid,
    # local_id by creation); by slot they are 2, 0, 1.
    assert _rendezvous([2, 0, 1], "stable-ranks-a") == {0: 2, 1: 0, 2: 1}


def test_elastic_survivors_are_numbered_densely_in_slot_order() -> None:
    # An M:N attempt (2:3) that two nodes joined, slots 2 and 0: completed at the last call
    # (not by the Nth node joining), dense ranks in slot order.
    assert _rendezvous([2, 0], "stable-ranks-b", max_nodes=3) == {0: 1, 1: 0}


def test_a_node_without_a_slot_leaves_torchs_order(caplog: pytest.LogCaptureFixture) -> None:
    # A node of an older spotrun (no slot in its descriptor): torch's order, one warning.
    with caplog.at_level(logging.WARNING, logger="spotrun.launch.ranks"):
        got = _rendezvous([1, None, 0], "stable-ranks-c")
    assert sorted(got.values()) == [0, 1, 2]
    assert any("not every node carries a slot" in r.getMessage() for r in caplog.records), caplog.text


def test_a_torch_whose_descriptor_differs_keeps_its_order_with_one_line(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

    @dataclasses.dataclass(eq=True, order=True, frozen=True)
    class OtherDesc:  # a future torch's descriptor: a field more
        addr: str
        pid: int
        local_id: int
        incarnation: int = 0

    before = dr.DynamicRendezvousHandler._node_desc_generator
    monkeypatch.setattr(dr, "_NodeDesc", OtherDesc)
    with caplog.at_level(logging.WARNING, logger="spotrun.launch.ranks"):
        assert ranks.install(1) is False
    assert dr.DynamicRendezvousHandler._node_desc_generator is before  # torch's own, untouched
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "torchrun's rendezvous order" in lines[0] and "incarnation" in lines[0], lines


def test_slot_rides_in_rdzv_conf_and_is_taken_out_before_torch_sees_it() -> None:
    spec = ClusterSpec(segment="s-1", nodes=[{"instance_id": f"i-{i}", "address": "127.0.0.1"} for i in range(3)],
                       nproc_per_node=1, rdzv_id="r-1", host=1)
    argv = node_argv(spec, "i-2", ["python", "t.py"])
    conf = argv[argv.index("--rdzv-conf") + 1]
    assert conf == f"is_host=0,{ranks.SLOT_KEY}=2"
    assert ranks.take_slot(conf) == ("is_host=0", 2)
    assert ranks.take_slot("is_host=1") == ("is_host=1", None)
    assert ranks.take_slot(f"{ranks.SLOT_KEY}=x,is_host=1") == ("is_host=1", None)  # dropped, warned
    assert ranks.take_slot("") == ("", None)


# -- one real 3-node run -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def replaced_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``spotrun launch --local --nodes 3`` of the FSDP2 recovery example (4 MiB per rank),
    node 0 vanishing once (``--seed 2`` draws node 0), ``--recovery replace``."""
    tmp = tmp_path_factory.mktemp("stable-ranks")
    run = tmp / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["SPOTRUN_LOCAL_DIR"] = str(tmp / "local")
    env["SPOTRUN_WARM_WORKERS"] = "0"
    argv = [sys.executable, "-m", "spotrun.cli", "launch", "--local", "--run-url", str(run),
            "--nodes", "3", "--nproc-per-node", "1", "--interruptions", "1", "--node-losses", "1",
            "--seed", "2", "--grace", "1", "--recovery", "replace", "--",
            "python", EXAMPLE, "--parallel", "fsdp", "--state-mib", str(STATE_MIB), "--steps", "10",
            "--every-steps", "2", "--step-sleep", "0.4"]
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT, cwd=REPO, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-8000:]
    # Every restore's line, by the slot folder of the node whose worker logged it: logs are
    # kept per machine, logs/<segment it started in>/node-<slot>/.
    resumes = []
    line = re.compile(r" rank(\d+) \S+ resumed from step (\d+) .*?; (.+?) from this machine's copy, "
                      r"(.+?) from peers, (.+?) from the run URL\)")
    for path in sorted((run / "logs").glob("*/node-*/*.log")):
        for m in line.finditer(path.read_text(errors="replace")):
            resumes.append({"segment": path.parent.parent.name, "slot": int(path.parent.name.split("-")[1]),
                            "rank": int(m.group(1)), "step": int(m.group(2)), "local": m.group(3),
                            "peer": m.group(4), "url": m.group(5)})
    records = list(Ledger(Storage(str(run))).records())
    return {"out": out, "run": run, "resumes": resumes, "records": records}


def _bytes(text: str) -> float:
    """``format_bytes``'s text ("0 B", "46.9 KiB", "4.06 MiB") as a number of bytes."""
    number, unit = text.split()
    return float(number) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


@pytest.mark.slow
def test_after_node_0_is_replaced_every_node_keeps_its_slot_as_rank(replaced_run: dict) -> None:
    out = replaced_run["out"]
    assert "sim-1-n0 (node 0) vanished without notice" in out, out[-8000:]
    recoveries = [(r["mode"], r["lost"], sorted(r["kept"]), r["instances_started"])
                  for r in replaced_run["records"] if r["event"] == "recovery_started" and r["source"] == "launcher"]
    assert recoveries == [("replace", ["sim-1-n0"], ["sim-1-n1", "sim-1-n2"], 1)], recoveries
    resumes = replaced_run["resumes"]
    # Three restores after the loss: two survivors (started in sim-1) and the replacement
    # (started in sim-2, in slot 0); each node's rank is its slot (one process per node).
    assert sorted((r["segment"], r["slot"]) for r in resumes) == [("sim-1", 1), ("sim-1", 2), ("sim-2", 0)], resumes
    assert all(r["rank"] == r["slot"] for r in resumes), resumes


@pytest.mark.slow
def test_survivors_restore_from_their_own_copy_and_the_replacement_from_its_buddy(replaced_run: dict) -> None:
    resumes = replaced_run["resumes"]
    share = STATE_MIB << 20
    survivors = [r for r in resumes if r["segment"] == "sim-1"]
    assert len(survivors) == 2 and all(_bytes(r["url"]) == 0 for r in survivors), resumes
    # Each survivor's own shard from its own copy; "from peers" is at most the few KiB of
    # files every rank reads (rank 0's payload and DCP's metadata), which rank 0 sends to
    # every node and a survivor reads from what its machine holds for others. Before stable
    # ranks a survivor whose rank changed read a whole shard from a peer here.
    assert all(_bytes(r["local"]) > 0.9 * share and _bytes(r["peer"]) < 0.05 * share for r in survivors), resumes
    (replacement,) = [r for r in resumes if r["segment"] == "sim-2"]
    assert _bytes(replacement["url"]) == 0 and 0.9 * share < _bytes(replacement["peer"]) < 1.1 * share, resumes
    # The books: the next attempt's restore read nothing from the run URL, and from peers
    # only the replacement's share (about STATE_MIB of weights and moments per rank), the
    # survivors' two shares from their local copies. Before stable ranks: one share local,
    # two from peers.
    (resumed,) = [r for r in replaced_run["records"]
                  if r["event"] == "training_resumed" and r.get("bytes_peer") is not None]
    assert resumed["bytes_url"] == 0, resumed
    assert 0.8 * share < resumed["bytes_peer"] < 1.25 * share, resumed
    assert resumed["bytes_local"] > 1.6 * share, resumed
