"""A big-state job for recovery runs: FSDP2 (sharded) or DDP (replicated), CPU or GPU.

    spotrun launch --local --nodes 3 --nproc-per-node 1 -- \
        python examples/recovery_train.py --parallel fsdp --state-mib 256 --steps 10

What ``scripts/bench_recovery.py`` runs: an MLP of ``--layers`` square layers whose width is
chosen so that each rank holds about ``--state-mib`` MiB of state (weights plus AdamW's two
moments): under FSDP2 (``fully_shard`` per layer, then the root) that is the rank's shard,
under DDP the whole replicated model. The batch of each step is drawn from a generator
seeded by (seed, step, rank) and the model has no dropout, so the run is a pure function of
the checkpoint it resumes from: an interrupted run that resumes on the same world size ends
bit-for-bit where an uninterrupted one does.

At the end rank 0 prints ``final-state SHA`` and writes SHA to ``--digest-file`` (when
given): sha256 over every rank's local weights and optimizer state, in rank order. It
identifies the state only for the same world size (shards differ with the world size).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import spotrun

MiB = 1 << 20


def width_for(state_mib: float, layers: int, parallel: str, world: int) -> int:
    """Layer width giving about ``state_mib`` MiB of state per rank (fp32 weights + 2 moments)."""
    per_rank_floats = state_mib * MiB / 4
    # FSDP: each rank holds 1/world of weights and moments; DDP: all of them.
    params = per_rank_floats / 3 * (world if parallel == "fsdp" else 1)
    return max(8, int(math.sqrt(params / layers)))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def local_digest(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """sha256 of this rank's weights and optimizer state, in parameter order."""
    h = hashlib.sha256()

    def add(t: torch.Tensor) -> None:
        t = _local(t).detach().to("cpu").contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    for name, p in model.named_parameters():
        h.update(name.encode())
        add(p)
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            h.update(key.encode())
            if isinstance(value, torch.Tensor):
                add(value)
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def _per_gradient_allreduce(_state, bucket):  # no annotations: DDP checks them, and here they are strings
    """A DDP communication hook: the mean of each gradient, one all-reduce per gradient."""
    grads = [g.div(dist.get_world_size()) for g in bucket.gradients()]
    for g in grads:
        dist.all_reduce(g)
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(torch.cat([g.reshape(-1) for g in grads]))
    return fut


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="run URL (default: $SPOTRUN_URL)")
    p.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp")
    p.add_argument("--state-mib", type=float, default=float(os.environ.get("SPOTRUN_EXAMPLE_STATE_MIB", 256)),
                   help="MiB of state per rank (weights + AdamW moments; default 256 or "
                        "$SPOTRUN_EXAMPLE_STATE_MIB)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--every-steps", type=int, default=2, help="checkpoint interval in steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digest-file", default=None, help="rank 0 writes the final state's sha256 here")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # several ranks share this machine's cores
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s rank{rank} %(name)s %(message)s")
    log = logging.getLogger("example")
    url = args.url or os.environ.get("SPOTRUN_URL") or "runs/recovery"
    torch.use_deterministic_algorithms(True)

    width = width_for(args.state_mib, args.layers, args.parallel, world)
    spotrun.seed_everything(args.seed)  # the same initial full weights on every rank
    layers = [nn.Linear(width, width) for _ in range(args.layers)]
    body: list[nn.Module] = []
    for layer in layers:
        body += [layer, nn.Tanh()]
    model: nn.Module = nn.Sequential(*body).to(device)
    if args.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        # Kept gathered from forward to backward: one all-gather per step, not two.
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        trained = model
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        trained = DDP(model, device_ids=[device.index] if cuda else None)
        # DDP rebuilds its gradient buckets after the first step of each process, so a
        # process that resumes at step k all-reduces step k in the initial layout while an
        # uninterrupted run uses the rebuilt one; the ring all-reduce's rounding depends on
        # where an element sits in the flat bucket, so the weights would differ in the last
        # bits. Reducing each gradient on its own makes the result independent of the layout.
        trained.register_comm_hook(None, _per_gradient_allreduce)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4, weight_decay=0.01)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        log.info("%s, %d ranks, width %d x %d layers: %.1f M parameters, about %.0f MiB of state per rank",
                 args.parallel, world, width, args.layers, n / 1e6,
                 n * 12 / MiB / (world if args.parallel == "fsdp" else 1))

    code: int | str | None = 0
    try:
        with spotrun.Checkpointer(url, model=trained, optimizer=optimizer, every_steps=args.every_steps,
                                  metadata={"script": "examples/recovery_train.py", "world": world,
                                            "parallel": args.parallel}) as ckpt:
            for step in ckpt.range(args.steps):
                # The batch depends only on (seed, step, rank): nothing to restore for it.
                g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
                x = torch.randn(args.batch_size, width, generator=g).to(device)
                loss = (trained(x) - x).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if args.step_sleep:
                    time.sleep(args.step_sleep)
                if rank == 0:
                    log.info("step %d loss %.6f", step + 1, loss.item())
        digests: list[str | None] = [None] * world
        dist.all_gather_object(digests, local_digest(model, optimizer))
        if rank == 0:
            final = hashlib.sha256("".join(str(d) for d in digests).encode()).hexdigest()
            print(f"final-state {final}", flush=True)
            if args.digest_file:
                tmp = f"{args.digest_file}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(final + "\n")
                os.replace(tmp, args.digest_file)
    except SystemExit as exc:  # 75 after a stop checkpoint, from the Checkpointer
        code = exc.code
    except Exception as exc:  # noqa: BLE001 - e.g. a peer node vanished: its collectives fail
        log.error("training failed: %s: %s", type(exc).__name__, exc)
        sys.stdout.flush()
        os._exit(1)  # no teardown: a process group with a dead peer can hang in it
    # Leave from here, with the model and the process group still referenced, and without
    # interpreter finalisation. Returning freed DDP's reducer, whose last reference to the gloo
    # process group ran its destructor, which joins gloo's worker thread while holding the GIL
    # that thread was waiting for: a warm-worker DDP rank hung there for minutes after its
    # final checkpoint (gdb: ~ProcessGroupGloo -> std::thread::join under Reducer's dealloc).
    # destroy_process_group is skipped for the same reason: the kernel closes the sockets.
    # Finalisation could abort the process too ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    main()
