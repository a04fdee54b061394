"""spotrun.launch.node without processes: cluster files, torchrun's argv, command forms.

The 2-node end-to-end run (real torchrun, real rendezvous) is tests/test_launch_node_e2e.py.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from spotrun.errors import ClusterWaitError, ConfigError, LaunchError
from spotrun.launch.node import (
    ClusterSpec,
    cluster_file,
    main,
    node_argv,
    read_cluster,
    torchrun_command,
    wait_for_cluster,
    write_cluster,
)
from spotrun.storage import Storage


def _spec(**kw) -> ClusterSpec:
    base = {"segment": "seg1", "nproc_per_node": 2, "rdzv_id": "run1-seg1", "port": 29555,
                "nodes": [{"instance_id": "i-0aaa", "address": "10.0.0.5"},
                       {"instance_id": "i-0bbb", "address": "10.0.0.6"},
                       {"instance_id": "i-0ccc", "address": "10.0.0.7"}]}
    base.update(kw)
    return ClusterSpec(**base)


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_cluster_file_round_trip_one_file_per_node(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    spec = _spec(min_nodes=2)
    paths = write_cluster(storage, spec)
    assert paths == [f"launch/nodes/{i}.json" for i in ("i-0aaa", "i-0bbb", "i-0ccc")]
    contents = {(tmp_path / "run" / p).read_text() for p in paths}
    assert len(contents) == 1  # the same content everywhere
    assert json.loads(contents.pop())["nodes"][0] == {"instance_id": "i-0aaa", "address": "10.0.0.5"}
    for node in spec.nodes:
        assert read_cluster(storage, node["instance_id"]) == spec
    assert read_cluster(storage, "i-0ddd") is None


def test_node_argv_head_and_joiner():
    spec = _spec()
    cmd = ["python", "train.py", "--lr", "3e-4"]
    head, joiner = node_argv(spec, "i-0aaa", cmd), node_argv(spec, "i-0ccc", cmd)
    for argv in (head, joiner):
        assert _opt(argv, "--nnodes") == "3"
        assert _opt(argv, "--nproc-per-node") == "2"
        assert _opt(argv, "--rdzv-backend") == "c10d"
        assert _opt(argv, "--rdzv-endpoint") == "10.0.0.5:29555"  # always node 0's address
        assert _opt(argv, "--rdzv-id") == "run1-seg1"
        assert _opt(argv, "--max-restarts") == "0"
        assert argv[-3:] == ["train.py", "--lr", "3e-4"]
        assert "--node-rank" not in argv  # c10d assigns group ranks, by slot (spotrun.launch.ranks)
    assert _opt(head, "--rdzv-conf") == "is_host=1,spotrun_slot=0"
    assert _opt(joiner, "--rdzv-conf") == "is_host=0,spotrun_slot=2"
    assert _opt(head, "--local-addr") == "10.0.0.5"
    assert _opt(joiner, "--local-addr") == "10.0.0.7"


def test_node_argv_elastic_and_ipv6():
    assert _opt(node_argv(_spec(min_nodes=2), "i-0bbb", ["t.py"]), "--nnodes") == "2:3"
    assert _opt(node_argv(_spec(min_nodes=3), "i-0bbb", ["t.py"]), "--nnodes") == "3"
    v6 = _spec(nodes=[{"instance_id": "a", "address": "fd00::1"}])
    assert _opt(node_argv(v6, "a", ["t.py"]), "--rdzv-endpoint") == "[fd00::1]:29555"


def test_node_argv_for_a_node_the_file_does_not_list():
    with pytest.raises(ClusterWaitError, match="does not list node 'i-0zzz'"):
        node_argv(_spec(), "i-0zzz", ["train.py"])


@pytest.mark.parametrize("command, expected", [
    (["python", "train.py", "-x"], ["train.py", "-x"]),
    (["python3", "-u", "train.py"], ["train.py"]),
    (["python3.12", "train.py"], ["train.py"]),
    ([sys.executable, "train.py"], ["train.py"]),
    (["python", "-m", "pkg.train", "--a", "1"], ["--module", "pkg.train", "--a", "1"]),
    (["train.py", "--a"], ["train.py", "--a"]),
    (["./bin/train.py"], ["./bin/train.py"]),
    (["bash", "run.sh", "x"], ["--no-python", "bash", "run.sh", "x"]),
    # Another interpreter than the one running spotrun: run as given, not swapped for ours.
    (["/opt/other-env/bin/python", "t.py"], ["--no-python", "/opt/other-env/bin/python", "t.py"]),
])
def test_command_forms(command, expected):
    assert torchrun_command(command) == expected


@pytest.mark.parametrize("command, message", [
    ([], "no command"),
    (["python"], "names no script"),
    (["python", "-u"], "names no script"),
    (["python", "-m"], "names no module"),
    (["python", "-c", "print(1)"], "interpreter option '-c'"),
    (["--nnodes", "2"], "starts with an option"),
])
def test_commands_it_cannot_run(command, message):
    with pytest.raises(ConfigError, match=message) as info:
        torchrun_command(command)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kw, message", [
    ({"nodes": []}, "at least one node"),
    ({"nodes": [{"instance_id": "a"}]}, "needs an instance_id and an address"),
    ({"nodes": [{"instance_id": "../x", "address": "h"}]}, "cannot name a cluster file"),
    ({"nodes": [{"instance_id": "a", "address": "h"}] * 2}, "repeat an instance id"),
    ({"port": 0}, "not a TCP port"),
    ({"nproc_per_node": 0}, "positive integer"),
    ({"rdzv_id": "a b"}, "rendezvous id"),
    ({"min_nodes": 4}, "between 1 and the 3 nodes"),
    ({"version": 99}, "newer than this spotrun"),
])
def test_bad_specs_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        _spec(**kw)


def test_unknown_keys_are_ignored_missing_ones_refused():
    data = _spec().to_json() | {"added_later": 1}
    assert ClusterSpec.from_json(data) == _spec()
    del data["rdzv_id"]
    with pytest.raises(ConfigError, match="incomplete"):
        ClusterSpec.from_json(data)


def test_wait_for_cluster_times_out_naming_the_path(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    t0 = time.monotonic()
    with pytest.raises(ClusterWaitError, match=r"launch/nodes/i-0aaa\.json after 0.2s") as info:
        wait_for_cluster(storage, "i-0aaa", timeout_s=0.2, poll_s=0.05)
    assert time.monotonic() - t0 < 2.0
    assert isinstance(info.value, LaunchError)


def test_wait_for_cluster_sees_a_file_written_while_waiting(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    writer = threading.Timer(0.2, write_cluster, args=(storage, _spec()))
    writer.start()
    try:
        assert wait_for_cluster(storage, "i-0bbb", timeout_s=10, poll_s=0.02) == _spec()
    finally:
        writer.join()


def test_wait_for_cluster_waits_past_another_segment(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    write_cluster(storage, _spec(segment="old", rdzv_id="run1-old"))
    with pytest.raises(ClusterWaitError, match="found one of segment old, not new"):
        wait_for_cluster(storage, "i-0aaa", timeout_s=0.1, poll_s=0.02, segment="new")
    write_cluster(storage, _spec(segment="new", rdzv_id="run1-new"))
    assert wait_for_cluster(storage, "i-0aaa", timeout_s=1, poll_s=0.02, segment="new").rdzv_id == "run1-new"


def test_main_fails_in_one_line_before_waiting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPOTRUN_URL", str(tmp_path / "run"))
    monkeypatch.setenv("SPOTRUN_INSTANCE_ID", "i-0aaa")
    assert main(["--timeout", "100", "--", "python", "-c", "1"]) == 2  # ConfigError, at once
    assert "interpreter option '-c'" in capsys.readouterr().err
    assert main(["--timeout", "0.1", "--poll", "0.02", "--", "python", "t.py"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("spotrun: error: no cluster file at ") and "\n" not in err
    monkeypatch.delenv("SPOTRUN_INSTANCE_ID")
    monkeypatch.delenv("SPOTRUN_SEGMENT_ID", raising=False)
    assert main(["--", "python", "t.py"]) == 2
    assert "SPOTRUN_INSTANCE_ID" in capsys.readouterr().err


def test_cluster_file_path_scheme():
    assert cluster_file("i-0123456789abcdef0") == "launch/nodes/i-0123456789abcdef0.json"
    with pytest.raises(ConfigError):
        cluster_file(".hidden")
