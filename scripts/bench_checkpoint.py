#!/usr/bin/env python
"""Checkpoint benchmark: how much a spotrun save costs training, against same-run baselines.

    python scripts/bench_checkpoint.py [--size-mib 512] [--s3] [--json out.json] [--repeats N]

State: an MLP plus its Adam optimizer (weights, exp_avg, exp_avg_sq), about ``--size-mib``
in all. Every figure is a ratio against a baseline measured in the same run, on the same
disk (``--dir``) and, with ``--s3``, the same moto server (started here as a separate
process on 127.0.0.1; nothing else is contacted). Medians over ``--repeats``.

1. training stall per checkpoint / synchronous torch.save + fsync      (target <= 0.10)
2. training stall per checkpoint / plain copy into preallocated memory (target <= 1.5)
3. training stall / DCP async_save stall                               (target <= 0.5)
4. save() -> durable / DCP async_save -> durable                       (target <= 1.0)
5. p50, p99 step time while a save persists / without saving          (target p99 <= 1.5)
6. local persist throughput / raw sequential write + fsync            (target >= 0.8)
7. S3 persist throughput / boto3 upload_fileobj to the same server    (target >= 1.0)
8. S3 restore throughput / boto3 download_fileobj from the same server (target >= 1.0)
9. restore time / min(torch.load + load_state_dict, DCP load)          (target <= 1.0)
10. peak extra memory of a save / state size                          (target <= 1.0)

DCP (``torch.distributed.checkpoint``) is measured interleaved with spotrun (each DCP save
right after a spotrun save, each DCP load right after a spotrun restore), each call on a
1-rank gloo group created and destroyed around it: ``async_save`` of
``get_state_dict(model, optimizer)`` to the same disk, and ``dcp.load`` +
``set_state_dict`` into another model/optimizer of the same shapes.

"Stall" is what ``Checkpointer.save()`` costs the training thread: with ``async_save`` (the
default, when this spotrun has it) the staging copy; without, the whole save. Figure 7 runs
in child processes, reading the kernel's peak-RSS counter (VmHWM, reset through
/proc/self/clear_refs) so allocator reuse from earlier measurements cannot hide anything.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import io
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

import spotrun  # noqa: E402
from spotrun.format.commit import read_manifest  # noqa: E402
from spotrun.storage import Storage  # noqa: E402

MiB = 1 << 20
ASYNC = "async_save" in inspect.signature(spotrun.Checkpointer.__init__).parameters

TARGETS = {
    "stall_vs_torch_save": ("<=", 0.10),
    "stall_vs_memory_copy": ("<=", 1.5),
    "stall_vs_dcp": ("<=", 0.5),
    "durable_vs_dcp": ("<=", 1.0),
    "step_time_while_persisting": ("<=", 1.5),  # on p99
    "local_persist_vs_raw_write": (">=", 0.8),
    "s3_persist_vs_boto3": (">=", 1.0),
    "s3_restore_vs_boto3": (">=", 1.0),
    "restore_vs_best": ("<=", 1.0),
    "save_peak_memory_vs_state": ("<=", 1.0),
}
TITLES = {
    "stall_vs_torch_save": "training stall / torch.save+fsync",
    "stall_vs_memory_copy": "training stall / copy into preallocated memory",
    "stall_vs_dcp": "training stall / DCP async_save stall",
    "durable_vs_dcp": "save() -> durable / DCP async_save -> durable",
    "step_time_while_persisting": "step time while persisting / without (p50, p99)",
    "local_persist_vs_raw_write": "local persist throughput / raw write+fsync",
    "s3_persist_vs_boto3": "S3 persist throughput / boto3 upload_fileobj",
    "s3_restore_vs_boto3": "S3 restore throughput / boto3 download_fileobj",
    "restore_vs_best": "restore / min(torch.load+load_state_dict, DCP load)",
    "save_peak_memory_vs_state": "peak extra memory of a save / state size",
}


# -- the state -------------------------------------------------------------------------------


@dataclass
class State:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    width: int
    device: str

    def tensors(self) -> list[torch.Tensor]:
        out = list(self.model.state_dict().values())
        for s in self.opt.state_dict()["state"].values():
            out += [v for v in s.values() if isinstance(v, torch.Tensor)]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def step(self, batch: int = 32) -> None:
        x = torch.randn(batch, self.width, device=self.device)
        loss = self.model(x).pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()


def build_state(size_mib: float, device: str, seed: int = 0) -> State:
    """An MLP + Adam of about ``size_mib`` MiB: weights and two moments, a third each."""
    torch.manual_seed(seed)
    params_bytes = size_mib * MiB / 3
    width = 1024 if params_bytes >= 64 * MiB else 256
    per_layer = (width * width + width) * 4
    layers = max(2, round(params_bytes / per_layer))
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*mods).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    st = State(model, opt, width, device)
    st.step()  # Adam's moments exist from the first step on
    return st


def fresh_like(st: State) -> State:
    """Another model/optimizer of the same shapes (different values) to restore into."""
    model = torch.nn.Sequential(
        *[torch.nn.Linear(st.width, st.width) if isinstance(m, torch.nn.Linear) else torch.nn.Tanh()
          for m in st.model]
    ).to(st.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    new = State(model, opt, st.width, st.device)
    new.step()
    return new


# -- helpers ---------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def sync_device(st: State) -> None:
    if st.device == "cuda":
        torch.cuda.synchronize()


def checkpointer(url: str, st: State, **kw: Any) -> spotrun.Checkpointer:
    return spotrun.Checkpointer(url, model=st.model, optimizer=st.opt, keep_last=1,
                                handle_signals=False, watchers=[], every_steps=10**9, **kw)


def timed_save(ck: spotrun.Checkpointer, step: int) -> tuple[float, float]:
    """(stall, persist): what save() cost the caller, then until the save was durable."""
    ck.steps_done = step
    t0 = time.perf_counter()
    ck.save()
    t1 = time.perf_counter()
    if ASYNC:
        ck.wait()
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) if ASYNC else (t2 - t0)


def payload_bytes(url: str, step: int) -> int:
    return read_manifest(Storage(url), step).total_bytes


def raw_write(path: str, buf: memoryview) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        while pos < len(buf):
            pos += os.write(fd, buf[pos : pos + 64 * MiB])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def torch_save_fsync(st: State, path: str) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": st.model.state_dict(), "optimizer": st.opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def drop(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (
        os.path.exists(path) and os.unlink(path))


# -- measurements ----------------------------------------------------------------------------


def measure_local(st: State, work: str, repeats: int, log: Any) -> dict[str, Any]:
    """Figures 1-4 and 6 on local disk."""
    r: dict[str, list[float]] = {k: [] for k in (
        "stall", "persist", "torch_save", "copy", "raw_write", "restore", "torch_load",
        "dcp_stall", "dcp_durable", "dcp_load")}
    dcp = DCPBaseline(work)
    steps_base: list[float] = []
    steps_persist: list[float] = []
    nbytes = 0

    # Baseline 2's buffers are allocated (and touched) once, like spotrun's staging buffers.
    src = st.tensors()
    dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=st.device == "cuda") for t in src]

    def copy_all() -> float:
        sync_device(st)
        t0 = time.perf_counter()
        for d, s in zip(dst, src, strict=True):
            d.copy_(s, non_blocking=st.device == "cuda")
        sync_device(st)
        return time.perf_counter() - t0

    copy_all()
    url = os.path.join(work, "run")
    ck = checkpointer(url, st)
    with ck:
        ck.restore()
        step = 1
        timed_save(ck, step)  # warm-up: allocates staging buffers, first files
        step_time = med([_timed_step(st) for _ in range(3)])
        for i in range(repeats):
            log(f"  local repeat {i + 1}/{repeats}")
            step += 1
            stall, persist = timed_save(ck, step)
            r["stall"].append(stall)
            r["persist"].append(persist)
            dcp_stall, dcp_durable = dcp.save(st)  # right after: the same load, as near as can be
            r["dcp_stall"].append(dcp_stall)
            r["dcp_durable"].append(dcp_durable)
            nbytes = payload_bytes(url, step)
            r["copy"].append(copy_all())
            path = os.path.join(work, "torch_save.pt")
            r["torch_save"].append(torch_save_fsync(st, path))
            buf = memoryview(bytearray(nbytes))
            r["raw_write"].append(raw_write(os.path.join(work, "raw.bin"), buf))
            del buf
            drop(os.path.join(work, "raw.bin"))

            # Figure 3: steps while the save is written, against as many steps without.
            n_base = max(5, min(60, math.ceil(persist / step_time) + 2))
            steps_base += [_timed_step(st) for _ in range(n_base)]
            step += 1
            ck.steps_done = step
            ck.save()
            if ASYNC:
                while True:
                    steps_persist.append(_timed_step(st))
                    if not ck.save_in_flight:
                        break
                ck.wait()
            else:
                # No background write to overlap with: the save happens inside one step.
                t0 = time.perf_counter()
                st.step()
                steps_persist.append(time.perf_counter() - t0 + persist)
                steps_persist += [_timed_step(st) for _ in range(n_base - 1)]

        # Figure 6: restore into another model/optimizer, against torch.load of the same
        # state from the baseline file (both files were just written: both in page cache).
        step += 1
        timed_save(ck, step)
        torch_save_fsync(st, os.path.join(work, "torch_save.pt"))
        dcp.save(st)
    # Restored by a second Checkpointer once the first has exited: a run has one writer
    # at a time (the lease), and a restore takes the lease like any Checkpointer.
    other = fresh_like(st)
    for _ in range(repeats):
        with checkpointer(url, other) as ck2:
            sync_device(other)
            t0 = time.perf_counter()
            got = ck2.restore()
            sync_device(other)
            r["restore"].append(time.perf_counter() - t0)
            assert got == step, (got, step)
        gc.collect()
        t0 = time.perf_counter()
        sd = torch.load(os.path.join(work, "torch_save.pt"), map_location="cpu",
                        weights_only=True)
        other.model.load_state_dict(sd["model"])
        other.opt.load_state_dict(sd["optimizer"])
        sync_device(other)
        r["torch_load"].append(time.perf_counter() - t0)
        del sd
        gc.collect()
        r["dcp_load"].append(dcp.load(other))
    for a, b in zip(st.model.state_dict().values(), other.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), "restored weights differ from the saved ones"
    dcp.close()
    drop(os.path.join(work, "torch_save.pt"))
    drop(url)
    return {"raw": r, "payload_bytes": nbytes, "steps_base": steps_base,
            "steps_persist": steps_persist, "step_time_s": step_time}


class DCPBaseline:
    """DCP's ``async_save`` (stall, durable) and ``dcp.load`` of the same state, same disk.

    Each call runs inside a 1-rank gloo group of its own (DCP needs one for its
    collectives), created and destroyed around it, so DCP is measured interleaved with
    spotrun, under the same load, while spotrun itself runs without a process group, as a
    single-process user runs it.
    """

    def __init__(self, work: str) -> None:
        self.work = work
        self.path: str | None = None
        self.n = 0

    def _group(self) -> Any:
        import contextlib

        import torch.distributed as dist

        @contextlib.contextmanager
        def group() -> Any:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                    world_size=1)
            try:
                yield
            finally:
                dist.destroy_process_group()

        return group()

    def save(self, st: State) -> tuple[float, float]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.path is not None:
            drop(self.path)
        self.n += 1
        self.path = os.path.join(self.work, f"dcp-{self.n}")
        with self._group():
            sync_device(st)
            t0 = time.perf_counter()
            msd, osd = get_state_dict(st.model, st.opt)
            fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=self.path)
            t1 = time.perf_counter()
            (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()
            return t1 - t0, time.perf_counter() - t0

    def load(self, other: State) -> float:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        assert self.path is not None
        with self._group():
            gc.collect()
            sync_device(other)
            t0 = time.perf_counter()
            msd, osd = get_state_dict(other.model, other.opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=self.path)
            set_state_dict(other.model, other.opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            sync_device(other)
            return time.perf_counter() - t0

    def close(self) -> None:
        if self.path is not None:
            drop(self.path)


def _timed_step(st: State) -> float:
    t0 = time.perf_counter()
    st.step()
    return time.perf_counter() - t0


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("moto server did not start; is moto[server] installed?") from None
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto server did not answer within 60 s")


def measure_s3(st: State, repeats: int, log: Any) -> dict[str, Any]:
    """Figure 5: spotrun's S3 persist against boto3's upload_fileobj, same moto server."""
    import boto3

    proc, endpoint = start_moto()
    try:
        # Only the local moto server: fake credentials, no metadata lookups.
        os.environ.update({
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        })
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            os.environ.pop(k, None)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        bucket = "spotrun-bench"
        s3.create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/run"
        persist: list[float] = []
        upload: list[float] = []
        s3_restore: list[float] = []
        download: list[float] = []
        nbytes = 0
        with checkpointer(url, st, storage_options={"skip_instance_cache": True}) as ck:
            ck.restore()
            timed_save(ck, 1)  # warm-up
            for i in range(repeats):
                log(f"  s3 repeat {i + 1}/{repeats}")
                _stall, p = timed_save(ck, 2 + i)
                persist.append(p)
                nbytes = payload_bytes(url, 2 + i)
                key = f"run/{2 + i:012d}/rank-00000.pt"
                blob = Storage(url, {"skip_instance_cache": True}).read_bytes(
                    f"{2 + i:012d}/rank-00000.pt")
                body = io.BytesIO(bytes(blob))
                del blob
                t0 = time.perf_counter()
                s3.upload_fileobj(body, bucket, "baseline.bin")
                upload.append(time.perf_counter() - t0)
                del body
                s3.delete_object(Bucket=bucket, Key="baseline.bin")
                assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == nbytes
        other = fresh_like(st)
        last = f"run/{1 + repeats:012d}/rank-00000.pt"
        for i in range(repeats):
            log(f"  s3 restore repeat {i + 1}/{repeats}")
            with checkpointer(url, other, storage_options={"skip_instance_cache": True}) as ck2:
                t0 = time.perf_counter()
                ck2.restore()
                s3_restore.append(time.perf_counter() - t0)
            gc.collect()
            # Baseline: the same object's bytes into memory, nothing verified or loaded.
            sink = io.BytesIO()
            t0 = time.perf_counter()
            s3.download_fileobj(bucket, last, sink)
            download.append(time.perf_counter() - t0)
            assert sink.getbuffer().nbytes == nbytes
            del sink
            gc.collect()
        return {"persist": persist, "upload_fileobj": upload, "restore": s3_restore,
                "download_fileobj": download, "payload_bytes": nbytes,
                "endpoint": "moto server, separate process"}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- figure 7 in child processes ---------------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class _Sampler:
    """Peak VmRSS by sampling, where VmHWM cannot be reset."""

    def __init__(self) -> None:
        self.peak = _rss_kib("VmRSS")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_kib("VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, _rss_kib("VmRSS"))


def memory_child(args: argparse.Namespace) -> None:
    st = build_state(args.size_mib, args.device)
    state = st.nbytes()
    work = tempfile.mkdtemp(prefix="mem-", dir=args.dir)
    gc.collect()
    out: dict[str, Any] = {"state_bytes": state}

    def peak_of(fn: Any) -> int:
        gc.collect()
        base = _rss_kib("VmRSS")
        exact = _reset_peak()
        sampler = None if exact else _Sampler()
        fn()
        peak = _rss_kib("VmHWM") if exact else sampler.stop()  # type: ignore[union-attr]
        return max(0, peak - base) * 1024

    if args.child_memory == "spotrun":
        url = os.path.join(work, "run")
        with checkpointer(url, st) as ck:
            ck.restore()
            out["first_save_extra"] = peak_of(lambda: timed_save(ck, 1))
            out["next_save_extra"] = peak_of(lambda: timed_save(ck, 2))
    else:
        out["first_save_extra"] = peak_of(lambda: torch_save_fsync(st, os.path.join(work, "t.pt")))
    out["peak_method"] = "VmHWM" if _reset_peak() else "VmRSS sampling"
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


def measure_memory(args: argparse.Namespace, which: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", which,
           "--size-mib", str(args.size_mib), "--device", args.device, "--dir", args.dir]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"memory measurement ({which}) failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------------


def figure(key: str, ratio: float | None, measured: str, baseline: str, **extra: Any) -> dict[str, Any]:
    op, target = TARGETS[key]
    ok = None if ratio is None else (ratio <= target if op == "<=" else ratio >= target)
    return {"title": TITLES[key], "ratio": None if ratio is None else round(ratio, 4),
            "target": f"{op} {target}", "meets_target": ok, "measured": measured,
            "baseline": baseline, **extra}


def machine() -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(), "ram_gib": round(mem / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__,
        "spotrun": getattr(spotrun, "__version__", "?"), "platform": platform.platform(),
        "async_save": ASYNC,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="spotrun-bench-", dir=args.dir)
    try:
        log(f"building a {args.size_mib} MiB model + Adam state on {args.device}")
        st = build_state(args.size_mib, args.device)
        state_bytes = st.nbytes()
        log("local disk: save, torch.save, copy, raw write, steps, restore")
        loc = measure_local(st, work, args.repeats, log)
        s3 = None
        if args.s3:
            log("S3 (moto server in a separate process)")
            s3 = measure_s3(st, args.repeats, log)
        log("memory (child processes)")
        mem = measure_memory(args, "spotrun")
        mem_torch = measure_memory(args, "torch_save")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    r = loc["raw"]
    stall, nbytes = med(r["stall"]), loc["payload_bytes"]
    figs: dict[str, Any] = {}
    figs["stall_vs_torch_save"] = figure(
        "stall_vs_torch_save", stall / med(r["torch_save"]),
        f"{stall:.4f} s", f"{med(r['torch_save']):.4f} s")
    figs["stall_vs_memory_copy"] = figure(
        "stall_vs_memory_copy", stall / med(r["copy"]),
        f"{stall:.4f} s", f"{med(r['copy']):.4f} s")
    durable = med([a + b for a, b in zip(r["stall"], r["persist"], strict=False)])
    dcp = {"stall": r["dcp_stall"], "durable": r["dcp_durable"], "load": r["dcp_load"]}
    figs["stall_vs_dcp"] = figure(
        "stall_vs_dcp", stall / med(dcp["stall"]),
        f"{stall:.4f} s", f"{med(dcp['stall']):.4f} s")
    figs["durable_vs_dcp"] = figure(
        "durable_vs_dcp", durable / med(dcp["durable"]),
        f"{durable:.4f} s", f"{med(dcp['durable']):.4f} s")
    sb, sp = loc["steps_base"], loc["steps_persist"]
    p50 = pct(sp, 0.5) / pct(sb, 0.5)
    p99 = pct(sp, 0.99) / pct(sb, 0.99)
    figs["step_time_while_persisting"] = figure(
        "step_time_while_persisting", p99,
        f"p50 {pct(sp, 0.5) * 1e3:.1f} ms, p99 {pct(sp, 0.99) * 1e3:.1f} ms ({len(sp)} steps)",
        f"p50 {pct(sb, 0.5) * 1e3:.1f} ms, p99 {pct(sb, 0.99) * 1e3:.1f} ms ({len(sb)} steps)",
        p50_ratio=round(p50, 4), p99_ratio=round(p99, 4))
    persist_tp = nbytes / med(r["persist"])
    raw_tp = nbytes / med(r["raw_write"])
    figs["local_persist_vs_raw_write"] = figure(
        "local_persist_vs_raw_write", persist_tp / raw_tp,
        f"{persist_tp / MiB:.0f} MiB/s", f"{raw_tp / MiB:.0f} MiB/s")
    if s3 is not None:
        s3_tp = s3["payload_bytes"] / med(s3["persist"])
        boto_tp = s3["payload_bytes"] / med(s3["upload_fileobj"])
        figs["s3_persist_vs_boto3"] = figure(
            "s3_persist_vs_boto3", s3_tp / boto_tp,
            f"{s3_tp / MiB:.0f} MiB/s", f"{boto_tp / MiB:.0f} MiB/s",
        )
        figs["s3_restore_vs_boto3"] = figure(
            "s3_restore_vs_boto3", med(s3["download_fileobj"]) / med(s3["restore"]),
            f"{s3['payload_bytes'] / med(s3['restore']) / MiB:.0f} MiB/s "
            f"({med(s3['restore']):.3f} s, verified and loaded)",
            f"{s3['payload_bytes'] / med(s3['download_fileobj']) / MiB:.0f} MiB/s "
            f"({med(s3['download_fileobj']):.3f} s, bytes only)")
    else:
        figs["s3_persist_vs_boto3"] = figure("s3_persist_vs_boto3", None, "skipped (no --s3)", "-")
        figs["s3_restore_vs_boto3"] = figure("s3_restore_vs_boto3", None, "skipped (no --s3)", "-")
    best = min(med(r["torch_load"]), med(dcp["load"]))
    figs["restore_vs_best"] = figure(
        "restore_vs_best", med(r["restore"]) / best,
        f"{med(r['restore']):.4f} s",
        f"{best:.4f} s (torch.load {med(r['torch_load']):.4f} s, DCP load "
        f"{med(dcp['load']):.4f} s)")
    extra = max(mem["first_save_extra"], mem.get("next_save_extra", 0))
    figs["save_peak_memory_vs_state"] = figure(
        "save_peak_memory_vs_state", extra / mem["state_bytes"],
        f"{extra / MiB:.0f} MiB (first save {mem['first_save_extra'] / MiB:.0f}, "
        f"next {mem.get('next_save_extra', 0) / MiB:.0f})",
        f"state {mem['state_bytes'] / MiB:.0f} MiB",
        torch_save_extra_ratio=round(mem_torch["first_save_extra"] / mem["state_bytes"], 4),
        peak_method=mem["peak_method"])
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine(),
        "config": {"size_mib": args.size_mib, "state_bytes": state_bytes,
                   "payload_bytes": nbytes, "repeats": args.repeats, "device": args.device,
                   "dir": args.dir, "step_time_s": round(loc["step_time_s"], 5),
                   "async_save": ASYNC},
        "figures": figs,
        "raw": {"local": {k: [round(x, 5) for x in v] for k, v in r.items()},
                "s3": None if s3 is None else {k: v for k, v in s3.items()},
                "memory": {"spotrun": mem, "torch_save": mem_torch}},
    }


def table(result: dict[str, Any]) -> str:
    rows = [("#", "figure", "measured", "baseline", "ratio", "target", "ok")]
    for i, (key, f) in enumerate(result["figures"].items(), 1):
        ratio = "-" if f["ratio"] is None else f"{f['ratio']:.3f}"
        if key == "step_time_while_persisting":
            ratio = f"p50 {f['p50_ratio']:.2f} / p99 {f['p99_ratio']:.2f}"
        ok = {True: "yes", False: "NO", None: "-"}[f["meets_target"]]
        rows.append((str(i), f["title"], f["measured"], f["baseline"], ratio, f["target"], ok))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=float, default=512, help="model + optimizer state size")
    p.add_argument("--s3", action="store_true", help="also measure S3 against a local moto server")
    p.add_argument("--json", metavar="PATH", help="write the results here as JSON")
    p.add_argument("--repeats", type=int, default=3, help="repeats per figure (medians)")
    p.add_argument("--dir", default=tempfile.gettempdir(),
                   help="where checkpoints and baseline files go (the disk under test)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model and optimizer live")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--child-memory", choices=("spotrun", "torch_save"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    if args.child_memory:
        memory_child(args)
        return 0
    result = run(args)
    print(table(result))
    print(json.dumps(result["figures"], indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
