"""The contract every storage backend honours, run against each of them.

Local disk, ``memory://`` (the generic fsspec backend) and ``s3://`` on the moto server
must all: round-trip bytes with the right size and checksum, never show a partial file after
a failed write, list / check / size / remove the same way, create a file only once with
``write_if_absent``, give exactly one winner to racing tagged writes (the lease), and raise
StorageNotFoundError for missing files. A new backend added with ``register_backend`` is
expected to pass this file when its URL is added to ``BACKENDS``.
"""

from __future__ import annotations

import os
import pickle
import threading
import uuid
from types import MappingProxyType

import pytest

from spotrun.errors import ConfigError, StorageNotFoundError, StorageURLError
from spotrun.format.checksum import entry_for
from spotrun.storage import (
    Backend,
    FsspecBackend,
    LocalBackend,
    ObjectStoreBackend,
    S3Backend,
    Storage,
    available_backends,
    register_backend,
)
from spotrun.storage import base as storage_base

MiB = 1 << 20
PART = 5 * MiB  # the smallest part S3 allows: multipart and ranged paths at small sizes

# name -> (backend class expected, whether write_if_absent is atomic under a race,
#          whether the tagged writes are exclusive under a race)
BACKENDS = {
    "local": (LocalBackend, True, True),
    "memory": (FsspecBackend, False, False),  # fsspec has no conditional write: best effort
    "s3": (S3Backend, False, True),  # write_if_absent: check then PUT; tagged: IfMatch
}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path) -> Storage:
    if request.param == "local":
        url = str(tmp_path / "run")
    elif request.param == "memory":
        url = f"memory://spotrun-contract/{uuid.uuid4().hex}"
    else:
        url = f"s3://{request.getfixturevalue('s3_bucket')}/run-{uuid.uuid4().hex[:8]}"
    st = Storage(url, part_size=PART, concurrency=3)
    st.ensure_root(create=True)
    st.contract = BACKENDS[request.param]  # type: ignore[attr-defined]
    return st


def _race(n: int, fn, *args) -> list:
    """Run ``fn(*args)`` on ``n`` threads released together; the non-None results."""
    barrier = threading.Barrier(n)
    results: list = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        got = fn(*args)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == n, "a racing writer did not finish"
    return [r for r in results if r is not None]


def test_backend_is_chosen_by_protocol(store: Storage) -> None:
    assert type(store.backend) is store.contract[0]
    # Pickled to another process: the same backend and files come back.
    store.write_bytes("p.bin", b"pickled")
    again = pickle.loads(pickle.dumps(store))
    assert type(again.backend) is store.contract[0]
    assert again.read_bytes("p.bin") == b"pickled"


@pytest.mark.parametrize("size", [0, 1000, 2 * PART + 12345])
def test_round_trip_size_and_checksum(store: Storage, size: int) -> None:
    data = os.urandom(size)
    digest = entry_for(data)
    with store.open_write("a/blob.bin") as f:
        for lo in range(0, size, 3 * MiB):  # several writes, crossing part boundaries
            f.write(data[lo : lo + 3 * MiB])
    assert (f.size, f.entry) == (size, digest)
    assert store.size("a/blob.bin") == size
    assert store.verify("a/blob.bin", digest) is None
    assert bytes(store.read_bytes("a/blob.bin")) == data
    with store.open_read("a/blob.bin") as r:
        assert r.read() == data
    assert store.write_bytes("a/small.bin", b"hello") == entry_for(b"hello")
    assert store.read_bytes("a/small.bin") == b"hello"


def test_failed_write_leaves_nothing_behind(store: Storage) -> None:
    store.write_bytes("d/keep.bin", b"old")
    for rel in ("d/keep.bin", "d/new.bin"):
        with pytest.raises(RuntimeError, match="boom"), store.open_write(rel) as f:
            f.write(b"x" * (PART + MiB))  # on S3 a part is already in flight
            raise RuntimeError("boom")
    assert store.read_bytes("d/keep.bin") == b"old"  # the last good file is untouched
    assert not store.exists("d/new.bin")
    assert store.list_dir("d") == ["keep.bin"]  # no temporary file left either


def test_list_exists_size_remove(store: Storage) -> None:
    assert store.list_dir() == []
    assert store.list_dir("missing") == []
    store.write_bytes("x/one.bin", b"1")
    store.write_bytes("x/sub/two.bin", b"22")
    store.write_bytes("top.bin", b"333")
    assert store.list_dir() == ["top.bin", "x"]
    assert store.list_dir("x") == ["one.bin", "sub"]
    assert store.exists("x/sub/two.bin") and not store.exists("x/three.bin")
    assert store.size("top.bin") == 3
    store.remove("top.bin")
    assert not store.exists("top.bin")
    store.remove("x")  # a whole folder
    assert store.list_dir() == [] and not store.exists("x/sub/two.bin")
    store.remove("x")  # missing is not an error


def test_missing_files_raise_not_found(store: Storage) -> None:
    for call in (store.read_bytes, store.size, store.open_read,
                 lambda rel: store.verify(rel, entry_for(b""))):
        with pytest.raises(StorageNotFoundError, match="does not exist"):
            call("nope/missing.bin")


def test_write_if_absent_creates_once(store: Storage) -> None:
    assert store.write_if_absent("r/rec.json", b"first") is True
    assert store.write_if_absent("r/rec.json", b"second") is False
    assert store.read_bytes("r/rec.json") == b"first"
    if store.contract[1]:
        assert len([r for r in _race(6, store.write_if_absent, "r/raced.json", b"x") if r]) == 1


def test_tagged_writes_have_one_winner(store: Storage) -> None:
    assert store.read_tagged("lease") is None
    tag = store.create_tagged("lease", b"v1")
    assert tag is not None
    assert store.create_tagged("lease", b"again") is None  # it exists
    assert store.read_tagged("lease") == (b"v1", tag)
    newer = store.replace_tagged("lease", b"v2", tag)
    assert newer is not None and newer != tag
    assert store.replace_tagged("lease", b"stale", tag) is None  # tag no longer current
    assert store.read_tagged("lease") == (b"v2", newer)
    if store.contract[2]:
        winners = _race(6, store.replace_tagged, "lease", b"raced", newer)
        assert len(winners) == 1
        assert store.read_tagged("lease") == (b"raced", winners[0])
        store.remove("raced-lease")
        assert len(_race(6, store.create_tagged, "raced-lease", b"c")) == 1


# -- the registry ----------------------------------------------------------------------


def test_registry_is_read_only_and_covers_the_builtins() -> None:
    backends = available_backends()
    assert isinstance(backends, MappingProxyType)
    assert backends["file"] is LocalBackend
    assert backends["s3"] is S3Backend and backends["s3a"] is S3Backend
    assert all(backends[p] is ObjectStoreBackend for p in ("gs", "gcs", "az", "abfs", "abfss"))
    with pytest.raises(TypeError):
        backends["file"] = FsspecBackend  # type: ignore[index]


def test_unknown_protocols_fall_back_to_fsspec_or_fail_with_a_hint() -> None:
    assert "memory" not in available_backends()
    assert type(Storage("memory://fallback/x").backend) is FsspecBackend
    with pytest.raises(StorageURLError, match="no fsspec backend for 'nosuchproto'.*install"):
        Storage("nosuchproto://bucket/run")


def test_register_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # Registrations are process-wide: work on a copy that the test throws away.
    monkeypatch.setattr(storage_base, "_BACKENDS", dict(storage_base._BACKENDS))
    written: list[str] = []

    class Recording(FsspecBackend):
        def write(self, path):
            written.append(path)
            yield from super().write(path)

    register_backend("memory", Recording)
    assert available_backends()["memory"] is Recording
    st = Storage(f"memory://registered/{uuid.uuid4().hex}")
    assert type(st.backend) is Recording
    st.write_bytes("a.bin", b"z")
    assert written == [st.full("a.bin")] and st.read_bytes("a.bin") == b"z"
    register_backend("memory", Recording)  # the same class again is fine
    with pytest.raises(ConfigError, match="replace=True"):
        register_backend("memory", FsspecBackend)
    register_backend("memory", FsspecBackend, replace=True)
    assert available_backends()["memory"] is FsspecBackend
    with pytest.raises(ConfigError, match="Backend subclass"):
        register_backend("other", object)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="protocol"):
        register_backend("", Backend)


def test_backends_are_imported_on_first_use(tmp_path, monkeypatch) -> None:
    import subprocess
    import sys

    # A fresh interpreter: a run on local disk loads no other backend's module.
    code = ("import sys; from spotrun.storage import Storage; Storage(sys.argv[1]).ensure_root("
            "create=True); print(sorted(m for m in sys.modules if m.startswith('spotrun.storage.')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "['spotrun.storage.base', 'spotrun.storage.local']"
    # A "module:Class" entry is imported when a URL first needs it, and checked then.
    monkeypatch.setattr(storage_base, "_BACKENDS", dict(storage_base._BACKENDS))
    register_backend("memory", "spotrun.storage.fsspec:ObjectStoreBackend")
    assert isinstance(storage_base._BACKENDS["memory"], str)
    assert type(Storage("memory://lazy/x").backend) is ObjectStoreBackend
    assert storage_base._BACKENDS["memory"] is ObjectStoreBackend
    register_backend("s3", S3Backend)  # the class its string names: the same entry
    register_backend("nope", "spotrun.storage.fsspec:NoSuchBackend")
    with pytest.raises(ConfigError, match="'spotrun.storage.fsspec:NoSuchBackend'.*cannot be imported"):
        Storage("nope://bucket/run")
    with pytest.raises(ConfigError, match="package.module:Class"):
        register_backend("other", "no_colon")


def test_move_folder_moves_every_file_and_leaves_no_source(store: Storage) -> None:
    files = {"manifest.json": b"{}", "rank-00000.pt": os.urandom(1000), "sub/x.bin": b"x"}
    for name, data in files.items():
        store.write_bytes(f"000000000007/{name}", data)
    store.write_bytes("000000000008/manifest.json", b"{}")
    store.move_folder("000000000007", "damaged/000000000007-moved", remove_first=["manifest.json"])
    assert "000000000007" not in store.list_dir()
    assert store.list_dir("damaged") == ["000000000007-moved"]
    for name, data in files.items():
        assert bytes(store.read_bytes(f"damaged/000000000007-moved/{name}")) == data
    assert store.list_dir("000000000008") == ["manifest.json"]  # a neighbour is untouched
