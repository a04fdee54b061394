"""A loop that rewrites its artifacts at every step and checkpoints at every step, for the
kill -9 test: right after its restore it prints what the artifacts hold, as JSON.

argv: WORKDIR (where the artifacts live) STEPS. Each step s writes blob.bin (an 8-digit
header s and 4 MiB of filler), out/metrics.json {"step": s}, out/odd.txt only on odd
steps, maybe.txt only on steps divisible by 3, and sets values["step"] = s.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import spotrun

root, steps = sys.argv[1], int(sys.argv[2])
blob, folder, maybe = (os.path.join(root, n) for n in ("blob.bin", "out", "maybe.txt"))


def seen() -> dict:
    out: dict = {}
    if os.path.exists(blob):
        with open(blob, "rb") as f:
            out["blob"] = int(f.read(8))
        out["blob_size"] = os.path.getsize(blob)
    if os.path.exists(os.path.join(folder, "metrics.json")):
        with open(os.path.join(folder, "metrics.json")) as f:
            out["metrics"] = json.load(f)["step"]
    out["odd"] = os.path.exists(os.path.join(folder, "odd.txt"))
    if os.path.exists(maybe):
        with open(maybe) as f:
            out["maybe"] = f.read()
    else:
        out["maybe"] = None
    out["files"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else None
    return out


model = torch.nn.Linear(4, 4)
with spotrun.Checkpointer(model=model, values={"step": 0}, artifacts=[blob, folder, maybe],
                          every_steps=1, keep_last=2) as ckpt:
    start = ckpt.restore()
    print("restored " + json.dumps({"step": start, "values_step": ckpt.values["step"], **seen()}),
          flush=True)
    for step in ckpt.range(steps):
        s = step + 1
        with open(blob, "wb") as f:
            f.write(f"{s:08d}".encode() + bytes([s % 251]) * (4 << 20))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            json.dump({"step": s}, f)
        odd = os.path.join(folder, "odd.txt")
        if s % 2:
            with open(odd, "w") as f:
                f.write(str(s))
        elif os.path.exists(odd):
            os.remove(odd)
        if s % 3 == 0:
            with open(maybe, "w") as f:
                f.write(str(s))
        elif os.path.exists(maybe):
            os.remove(maybe)
        with torch.no_grad():
            model.weight.fill_(s)
        ckpt.values["step"] = s
        print(f"step {s}", flush=True)
