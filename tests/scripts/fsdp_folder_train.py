"""FSDP2 on CPU ranks (gloo) saving the checkpoint folder an FSDP trainer writes, committed
through spotrun's trainer-folder protocol (``RunSession``, what the HF and Accelerate
integrations use).

    python -m torch.distributed.run --nproc-per-node 2 tests/scripts/fsdp_folder_train.py \
        --url RUN --steps 12 --save-steps 4 [--stop-at 8] [--staging DIR]

The HF Trainer and Accelerate switch FSDP off on CPU (they pick MULTI_CPU, plain DDP), so
this script writes their FSDP layout itself, with the same torch calls: the sharded model
and optimizer through torch.distributed.checkpoint into ``pytorch_model_fsdp_0/`` and
``optimizer_0/`` (SHARDED_STATE_DICT), each rank's RNG in ``rng_state_<rank>.pth`` and
``trainer_state.json`` with the step. ``--stop-at N`` commits step N through the stop path
and exits 75. Rank 0 prints ``full-state SHA`` of the gathered model and optimizer at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ddp_train import make_data, say  # run as a script, its own folder is on sys.path
from fsdp_train import DIMS, digest, full_state
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import spotrun
from spotrun.integrations._session import RunSession
from spotrun.integrations.hf import _step_problems


def save_folder(folder: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, [optimizer])
    dcp.save(model_sd, checkpoint_id=os.path.join(folder, "pytorch_model_fsdp_0"))
    dcp.save(optim_sd, checkpoint_id=os.path.join(folder, "optimizer_0"))
    torch.save(torch.get_rng_state(), os.path.join(folder, f"rng_state_{rank}.pth"))
    if rank == 0:
        with open(os.path.join(folder, "trainer_state.json"), "w") as f:
            json.dump({"global_step": step}, f)


def load_folder(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    model_sd, optim_sd = get_state_dict(model, [optimizer])
    dcp.load(model_sd, checkpoint_id=os.path.join(folder, "pytorch_model_fsdp_0"))
    dcp.load(optim_sd, checkpoint_id=os.path.join(folder, "optimizer_0"))
    set_state_dict(model, [optimizer], model_state_dict=model_sd, optim_state_dict=optim_sd)
    torch.set_rng_state(torch.load(os.path.join(folder, f"rng_state_{dist.get_rank()}.pth"),
                                   weights_only=True))
    with open(os.path.join(folder, "trainer_state.json")) as f:
        return int(json.load(f)["global_step"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--staging", required=True)
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    spotrun.seed_everything(0)
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(DIMS)]
    model = nn.Sequential(layers[0], nn.GELU(), nn.Dropout(0.2), layers[1], nn.GELU(), layers[2])
    mesh = init_device_mesh("cpu", (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    spotrun.seed_everything(1000 + rank)  # each rank its own dropout masks
    x_all, y_all = make_data(96, DIMS[0], DIMS[-1], seed=1234).tensors

    session = RunSession(args.url, handle_signals=False, watchers=[], keep_last=100)
    code = 0
    try:
        session.start()
        path = session.resume_dir(args.staging, check=_step_problems)
        start = load_folder(path, model, optimizer) if path else 0
        say(f"rank {rank} start {start} manifest-files "
            f"{len(os.listdir(path)) if path else 0}")
        session.training_started(start)
        for step in range(start, args.steps):
            rows = torch.arange(step * 8, step * 8 + 8) % len(x_all)
            rows = rows[rank::world]
            loss = nn.functional.cross_entropy(model(x_all[rows]), y_all[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = step + 1
            session.poll(done)
            folder = os.path.join(args.staging, f"checkpoint-{done}")
            if done == args.stop_at:
                save_folder(folder, done, model, optimizer)
                session.stop(done, folder)  # commits, raises SystemExit(75)
            if done % args.save_steps == 0 or done == args.steps:
                save_folder(folder, done, model, optimizer)
                session.commit_folder(done, folder)
        session.finish(args.steps)
        state = full_state(model, optimizer)
        if rank == 0:
            say(f"full-state {digest(state)}")
    except SystemExit as exc:
        code = int(exc.code or 0)
    say(f"rank {rank} exit {code}")
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # see fsdp_train.py: gloo threads can abort at finalisation
