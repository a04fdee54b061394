"""An FSDP2 model + AdamW under torchrun (gloo, CPU) that saves or loads a sharded checkpoint.

``--optim mixed``: three optimizers over the layers instead (AdamW with amsgrad and two
param groups, one frozen parameter; SGD with Nesterov momentum; a row-vector optimizer
whose state is not shaped like its parameter).

    save:  train a few steps, write through spotrun.format.sharded (sync or --async, the latter
           while the training thread keeps running all_reduces), rank 0 commits the
           manifest and keeps the gathered full state next to it (--reference) for checking.
    load:  build a fresh model on this many ranks, read_sharded (resharding), gather the
           full state and compare it (torch.equal) with --reference; or, with
           --expect-error, print which spotrun error the load raised.

Each rank prints "rank R ok ..." or "rank R error CLASS"; the test reads these lines.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: slowfs, optim_tools

import slowfs
import torch
import torch.distributed as dist
from optim_tools import RowScaled, counting_steps
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from spotrun.errors import SpotrunError
from spotrun.format.commit import commit, read_manifest
from spotrun.format.manifest import Manifest
from spotrun.format.optim_init import init_optimizer_state
from spotrun.format.sharded import (
    ShardedSaver,
    get_state,
    is_sharded,
    read_metadata,
    read_sharded,
    set_state,
    write_sharded,
)
from spotrun.storage import Storage

DIMS = [12, 33, 20, 7]  # odd sizes: uneven shards on 2, 3 and 4 ranks


def say(line: str) -> None:
    # One write per line: print() writes the text and the newline separately, and lines
    # of ranks sharing one stdout would interleave.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def build(world: int, kind: str = "adamw") -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(DIMS)]
    model = torch.nn.Sequential(*layers)
    mesh = init_device_mesh("cpu", (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if kind == "adamw":
        return model, [torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)]
    first, second, third = layers
    third.bias.requires_grad_(False)  # frozen: in an optimizer, never given state
    return model, [
        torch.optim.AdamW([{"params": [first.weight, third.bias], "weight_decay": 0.1},
                           {"params": [first.bias], "weight_decay": 0.0, "lr": 3e-3}],
                          lr=1e-2, amsgrad=True),
        torch.optim.SGD(second.parameters(), lr=1e-2, momentum=0.9, nesterov=True,
                        weight_decay=0.01),
        RowScaled([third.weight]),
    ]


def train(model: torch.nn.Module, optims: list[torch.optim.Optimizer], rank: int,
          steps: int) -> None:
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(8, DIMS[0], generator=gen)
        loss = model(x).square().mean()
        loss.backward()
        for optim in optims:
            optim.step()
            optim.zero_grad()


def full_state(model: torch.nn.Module, optim: list[torch.optim.Optimizer]) -> dict:
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=opts),
            "optim": get_optimizer_state_dict(model, optim, options=opts)}


def differences(a, b, path="") -> list[str]:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
              and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}/{i}")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "load"])
    p.add_argument("--url", required=True)
    p.add_argument("--step", type=int, default=3)
    p.add_argument("--reference", required=True)
    p.add_argument("--async", dest="use_async", action="store_true")
    p.add_argument("--expect-error", action="store_true")
    p.add_argument("--optim", choices=["adamw", "mixed"], default="adamw")
    args = p.parse_args()

    if args.url.startswith("slowdcp://"):
        slowfs.register()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    storage = Storage(args.url)
    model, optim = build(world, args.optim)
    assert is_sharded(model) and all(is_sharded(o) for o in optim)

    if args.mode == "save":
        train(model, optim, rank, args.step)
        state = get_state(model, optim)
        assert is_sharded(state)
        if args.use_async:
            saver = ShardedSaver(storage)
            staged = saver.stage(state)
            fut = saver.write_async(args.step, staged)
            # The training thread keeps running collectives on the default group while
            # the background write runs its own on the saver's group. Each round's first
            # all_reduce also agrees whether every rank's write is done, so all ranks run
            # the same number of rounds.
            reduces = during = 0
            base = torch.arange(1000, dtype=torch.float64)
            ranks_sum = world * (world + 1) / 2
            while True:
                pending = torch.tensor([0.0 if fut.done() else 1.0])
                dist.all_reduce(pending)
                t = base * (rank + 1) + reduces
                dist.all_reduce(t)
                assert torch.equal(t, base * ranks_sum + world * reduces), "all_reduce disturbed"
                reduces += 1
                during += int(not fut.done())
                if pending.item() == 0 and reduces >= 5:
                    break
            files = fut.result()
            saver.close()
            say(f"rank {rank} overlapped {during} of {reduces} all_reduces")
        else:
            files = write_sharded(storage, args.step, state)
        full = full_state(model, optim)
        if rank == 0:
            commit(storage, Manifest(step=args.step, files=dict(files), world_size=world))
            torch.save(full, args.reference)
        dist.barrier()
        say(f"rank {rank} ok saved {sorted(n for n, _ in files)}")
    else:
        manifest = read_manifest(storage, args.step)
        with counting_steps(optim) as steps:
            try:
                # The restore's order (spotrun.checkpoint.restore): the fresh optimizers'
                # state from DCP's index where it fits, so building the state runs no step.
                metadata = read_metadata(storage, manifest)
                made = init_optimizer_state(model, optim, metadata)
                state = get_state(model, optim)
                read_sharded(storage, manifest, state, metadata=metadata)
            except SpotrunError as exc:
                say(f"rank {rank} error {type(exc).__name__}: {exc}")
                dist.destroy_process_group()
                return 0 if args.expect_error else 1
            if args.expect_error:
                say(f"rank {rank} loaded a damaged checkpoint without error")
                return 1
            set_state(model, optim, state)
        say(f"rank {rank} load made {[optim.index(o) for o in made]} ran steps {steps}")
        full = full_state(model, optim)
        if rank == 0:
            saved = torch.load(args.reference, weights_only=True)
            diff = differences(saved, full)
            if diff:
                say(f"rank 0 MISMATCH {diff[:10]}")
                return 1
        # One more step must run on the resharded state (optimizer state in place).
        train(model, optim, rank, 1)
        say(f"rank {rank} ok loaded on {world} ranks")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Leave without interpreter finalization: torch's gloo worker threads can SIGABRT there
    # ("terminate called without an active exception", ~1 run in 5 with plain torchrun, after
    # destroy_process_group) and turn a finished run into a failed one. The tests assert on
    # what this script did, not on torch's teardown.
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
