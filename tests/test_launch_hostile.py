"""Hostile inputs to the launchers (issue 20, launch items): a cluster file that names a
segment outside ``logs/`` or booleans for counts, flags of absurd or non-finite size, and the
log shipper's memory while the store is down."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spotrun.cli import main
from spotrun.errors import ConfigError
from spotrun.launch.common import MAX_NODES
from spotrun.launch.ec2 import Ec2Api
from spotrun.launch.ec2_options import Ec2Options
from spotrun.launch.local import LocalOptions
from spotrun.launch.logs import LogShipper, _cluster_resolver, read_logs
from spotrun.launch.node import ClusterSpec, cluster_file
from spotrun.launch.node import main as node_main
from spotrun.storage import Storage


def _cluster(**override: object) -> dict:
    data = {"segment": "a1", "nodes": [{"instance_id": "i-0aaa", "address": "127.0.0.1"}],
            "nproc_per_node": 1, "rdzv_id": "run-a1", "port": 29555, "version": 1}
    data.update(override)
    return data


def _write_raw(st: Storage, instance_id: str, data: dict) -> None:
    """A cluster file as a hostile writer would leave it (not through write_cluster)."""
    st.write_bytes(cluster_file(instance_id), json.dumps(data).encode())


# -- the cluster file ---------------------------------------------------------------------


@pytest.mark.parametrize(("override", "words"), [
    ({"port": True}, "not a TCP port"),  # was accepted: the endpoint became 127.0.0.1:True
    ({"port": 29555.0}, "not a TCP port"),
    ({"port": "29555"}, "not a TCP port"),
    ({"nproc_per_node": True}, "nproc_per_node"),
    ({"nproc_per_node": 10**6}, "nproc_per_node"),
    ({"min_nodes": True}, "min_nodes"),
    ({"version": True}, "version"),
    ({"segment": "../../ESCAPED"}, "segment"),
    ({"segment": 7}, "segment"),
    ({"nodes": [{"instance_id": "i-0aaa", "address": True}]}, "address"),
])
def test_cluster_file_refuses_wrong_types_and_ranges(override: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        ClusterSpec.from_json(_cluster(**override))
    assert "\n" not in str(info.value)


def test_node_refuses_a_cluster_file_with_an_escaping_segment_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    st = Storage(str(tmp_path / "run"))
    _write_raw(st, "i-0aaa", _cluster(segment="../../ESCAPED"))
    monkeypatch.setenv("SPOTRUN_URL", st.url)
    monkeypatch.setenv("SPOTRUN_INSTANCE_ID", "i-0aaa")
    code = node_main(["--timeout", "5", "--poll", "0.05", "--", "python", "train.py"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "segment '../../ESCAPED'" in err, err


def test_log_shipper_falls_back_to_its_own_segment_on_a_bad_cluster_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Was: the shipping thread died with a ConfigError traceback and shipped nothing."""
    st = Storage(str(tmp_path / "run"))
    _write_raw(st, "i-0aaa", _cluster(segment="../../ESCAPED"))
    caplog.set_level(logging.WARNING, logger="spotrun")
    sh = LogShipper(st, "i-0aaa", 0, flush_s=0.02, resolve=_cluster_resolver(st, "i-0aaa"))
    sh.write(b"step 1\n")
    sh.write(b"step 2\n")
    assert sh.close(timeout=10) is True
    assert b"".join(d for _, _, d in read_logs(st, segment="i-0aaa", node=0)) == b"step 1\nstep 2\n"
    assert not (tmp_path / "ESCAPED").exists() and not (tmp_path / "run" / "ESCAPED").exists()
    warned = [r.getMessage() for r in caplog.records if "ESCAPED" in r.getMessage()]
    assert len(warned) == 1 and "logs/i-0aaa/node-0" in warned[0], warned


# -- flags and options --------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "needle"), [
    (["--nodes", str(10**6)], "--nodes"),
    (["--nproc-per-node", str(10**6)], "--nproc-per-node"),
    (["--nodes", "2", "--min-nodes", "true"], "--min-nodes"),
    (["--nodes", "2.5"], "--nodes"),
    (["--max-failures", "-1"], "--max-failures"),
    (["--max-interruptions", "-1"], "--max-interruptions"),
    (["--max-price", "nan"], "--max-price"),
    (["--max-price", "0"], "--max-price"),
    (["--poll", "inf"], "--poll"),
    (["--poll", "0"], "--poll"),
    (["--spot-wait", "nan"], "--spot-wait"),
    (["--spot-wait", "-1"], "--spot-wait"),
])
def test_ec2_launch_flags_out_of_range_are_refused_at_parse(
        argv: list[str], needle: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Ec2Api, "for_region", lambda *_a: pytest.fail("no EC2 client for a refused launch"))
    with pytest.raises(SystemExit) as exc:
        main(["launch", "--run-url", "s3://b/x", "--instance-types", "g5.xlarge", *argv, "--", "python", "t.py"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err, err
    assert len(err.strip().splitlines()) <= 2  # argparse's usage line and one error line


@pytest.mark.parametrize(("argv", "needle"), [
    (["--grace", "nan"], "--grace"),  # was: started, then the segment failed
    (["--grace", "inf"], "--grace"),
    (["--grace", "0"], "--grace"),
    (["--mean-interval", "nan"], "--mean-interval"),
    (["--mean-interval", "-5"], "--mean-interval"),
    (["--interruptions", "-1"], "--interruptions"),
    (["--node-losses", "x"], "--node-losses"),
])
def test_local_launch_flags_out_of_range_are_refused_at_parse(
        argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["launch", "--local", "--run-url", str(run), *argv, "--", sys.executable, "-c", "pass"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err, err
    assert len(err.strip().splitlines()) <= 2
    assert not run.exists()  # refused before anything started


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_stop_wait_out_of_range_is_refused_at_parse(value: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["stop", str(tmp_path / "run"), "--wait", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--wait" in err, err  # was: accepted (float('nan'))
    assert len(err.strip().splitlines()) <= 2


@pytest.mark.parametrize("kw", [
    {"nodes": 10**6}, {"nodes": True}, {"nproc_per_node": 10**6}, {"nproc_per_node": True},
    {"grace_s": math.nan}, {"grace_s": math.inf}, {"mean_interval": math.nan}, {"peer_exit_s": math.nan},
    {"interruptions": True}, {"max_failures": -1},
])
def test_local_options_refuse_what_the_flags_refuse(kw: dict) -> None:
    with pytest.raises(ConfigError) as info:
        LocalOptions(run_url="r", command=["x"], **kw).validate()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kw", [{"nodes": MAX_NODES + 1}, {"nproc_per_node": 10**6}, {"nproc_per_node": True}])
def test_ec2_options_refuse_absurd_counts(kw: dict) -> None:
    with pytest.raises(ConfigError, match="--n"):
        Ec2Options(run_url="s3://b/r", command=["python", "t.py"], instance_types=["g5.xlarge"], **kw).validate()


# -- the log shipper's memory ----------------------------------------------------------------


def test_shipper_buffer_never_exceeds_its_bound_while_the_store_is_down(tmp_path: Path) -> None:
    class Down:
        url = "down://x"

        def write_bytes(self, *_a: object, **_k: object) -> None:
            raise OSError("store down")

        def display(self, path: str = "") -> str:
            return f"down://x/{path}"

    bound = 4096
    sh = LogShipper(Down(), "sim-1", 0, flush_s=0.01, max_chunk_bytes=512, max_buffer_bytes=bound)  # type: ignore[arg-type]
    peak = 0
    for i in range(2000):
        sh.write(f"{i:06d} ".encode() * (1 + i % 300))  # up to 2 KiB a write, and one of 10 KiB:
        peak = max(peak, len(sh._buf))
    sh.write(b"y" * 10 * bound)
    peak = max(peak, len(sh._buf))
    assert peak <= bound
    assert sh.bytes_dropped > 0
    sh.close(timeout=0.1)


_RSS_PROBE = textwrap.dedent("""
    import resource, sys
    from spotrun.launch.logs import LogShipper, MiB

    class Down:
        url = "down://x"
        def write_bytes(self, *a, **k):
            raise OSError("store down")
        def display(self, path=""):
            return "down://x/" + path

    bound = 16 * MiB
    sh = LogShipper(Down(), "sim-1", 0, flush_s=0.05, max_buffer_bytes=bound)
    sh.write(b"warm-up\\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    line = b"x" * 1023 + b"\\n"
    for i in range(4 * 16 * 16):  # 4x the bound, in 64 KiB writes (each a new object)
        sh.write(bytearray(line * 64))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024 / bound)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's unit")
def test_shipper_memory_while_the_store_is_down_stays_near_its_bound(tmp_path: Path) -> None:
    """Was about 2x: a bytearray trimmed at its front re-allocates and copies itself whole
    while the old copy is still held (launcher RSS 172-175 MiB against a 64 MiB bound)."""
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, timeout=120,
                         check=True)
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio < 1.4, f"peak memory grew by {ratio:.2f}x the buffer's bound"
