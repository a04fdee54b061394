"""Manifest format 2 (CRC32C per chunk) and format 1 (sha256) checkpoints.

The chunk checksums a write computes on the way out (any write sizes, parallel pieces) are
those of the bytes on disk; damage anywhere is found; checkpoints written by spotrun before
format 2 (``tests/data/format1-run``, written by the sha256 code at commit 93a77d5: steps 1
and 2 of a Linear(4, 3) with SGD momentum, weight = arange(12) * step, bias = step) still
verify, restore, and fall back when damaged.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import crc32c
import pytest
import torch

import spotrun
from spotrun.errors import CorruptCheckpointError, UnsupportedFormatError
from spotrun.format import checksum
from spotrun.format.commit import find_latest_valid, list_checkpoints, verify_checkpoint
from spotrun.format.manifest import FORMAT_VERSION, FileEntry, Manifest
from spotrun.records.layout import MANIFEST, checkpoint_dir
from spotrun.storage import HashingWriter, Storage

FORMAT1_RUN = Path(__file__).parent / "data" / "format1-run"
CHUNK = 1 << 20  # small chunks keep these tests fast; the writer's own is checksum.CHUNK


def _reference(data: bytes, chunk: int) -> tuple[str, ...]:
    return tuple(f"{crc32c.crc32c(data[lo:lo + chunk]):08x}" for lo in range(0, len(data), chunk))


@pytest.mark.parametrize("pieces", [[0], [1], [CHUNK], [CHUNK - 1, 2, CHUNK * 5 + 3, 7, 1],
                                    [300_000] * 30, [6 * CHUNK + 5]])
def test_streamed_chunks_match_a_plain_crc32c_of_each_chunk(pieces):
    data = os.urandom(sum(pieces))
    crc, pos = checksum.ChunkedCRC(CHUNK), 0
    for n in pieces:  # writes crossing chunk boundaries, several chunks at once (parallel)
        crc.update(data[pos:pos + n])
        pos += n
    assert crc.entry() == FileEntry(len(data), crc32c=_reference(data, CHUNK), chunk=CHUNK)
    assert checksum.entry_for(data, CHUNK) == crc.entry()
    assert checksum.problem(data, crc.entry()) is None


def test_hashing_writer_entry_is_the_chunk_crcs_of_what_it_wrote():
    data = os.urandom(2 * checksum.CHUNK + 12345)
    out = io.BytesIO()
    w = HashingWriter(out)
    for lo in range(0, len(data), 5 << 20):
        w.write(data[lo:lo + (5 << 20)])
    assert out.getvalue() == data
    assert w.entry == FileEntry(len(data), crc32c=_reference(data, checksum.CHUNK),
                                chunk=checksum.CHUNK)


def test_damage_anywhere_is_found_and_located(tmp_path):
    data = bytearray(os.urandom(4 * CHUNK + 10))
    entry = checksum.entry_for(data, CHUNK)
    path = tmp_path / "f.bin"
    for i in (0, CHUNK - 1, 3 * CHUNK + 5, len(data) - 1):
        data[i] ^= 0x01
        lo = i // CHUNK * CHUNK
        assert f"bytes {lo}-" in checksum.problem(data, entry)
        path.write_bytes(data)
        assert "does not match" in checksum.problem_in_file(str(path), entry)
        data[i] ^= 0x01
    assert checksum.problem(data[:-1], entry).startswith(f"{len(data) - 1} bytes")
    path.write_bytes(data)
    assert checksum.problem_in_file(str(path), entry) is None


def test_manifest_round_trip_and_malformed_chunk_lists():
    entry = checksum.entry_for(b"x" * (2 * CHUNK + 1), CHUNK)
    m = Manifest(step=3, files={"rank-00000.pt": entry})
    back = Manifest.from_json(m.to_json(), where="m")
    assert back.files == m.files and back.format_version == FORMAT_VERSION == 2
    raw = json.loads(m.to_json())
    assert raw["files"]["rank-00000.pt"] == {"size": 2 * CHUNK + 1, "chunk": CHUNK,
                                             "crc32c": list(entry.crc32c)}
    raw["files"]["rank-00000.pt"]["crc32c"].pop()  # one chunk's checksum missing
    with pytest.raises(CorruptCheckpointError, match="malformed"):
        Manifest.from_json(json.dumps(raw).encode(), where="m")
    raw["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(UnsupportedFormatError, match="upgrade spotrun"):
        Manifest.from_json(json.dumps(raw).encode(), where="m")


def _format1_copy(tmp_path: Path) -> str:
    url = str(tmp_path / "run")
    shutil.copytree(FORMAT1_RUN, url)
    return url


def _restore(url: str) -> tuple[int, torch.nn.Module]:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with spotrun.Checkpointer(url, model=model, optimizer=opt, async_save=False,
                              handle_signals=False, watchers=[]) as ck:
        return ck.restore(), model


def test_format1_checkpoint_still_verifies_and_restores(tmp_path):
    url = _format1_copy(tmp_path)
    st = Storage(url)
    infos = list_checkpoints(st)
    assert [(c.step, c.manifest.format_version) for c in infos] == [(1, 1), (2, 1)]
    assert all(e.sha256 and not e.chunk for c in infos for e in c.manifest.files.values())
    assert all(verify_checkpoint(st, c.manifest) == [] for c in infos)
    step, model = _restore(url)
    assert step == 2
    assert torch.equal(model.weight.detach(), torch.arange(12.).reshape(3, 4) * 2)
    assert torch.equal(model.bias.detach(), torch.full((3,), 2.0))


def test_damaged_format1_checkpoint_falls_back_by_its_sha256(tmp_path):
    url = _format1_copy(tmp_path)
    payload = Path(url, checkpoint_dir(2), "rank-00000.pt")
    data = bytearray(payload.read_bytes())
    i = data.find((torch.arange(12.) * 2).numpy().tobytes())  # the step-2 weights
    assert i > 0
    data[i + 1] ^= 0x40  # same size, still unpickles: only the sha256 can tell
    payload.write_bytes(bytes(data))
    st = Storage(url)
    [problem] = verify_checkpoint(st, list_checkpoints(st)[-1].manifest)
    assert "sha256" in problem and "corrupted" in problem
    assert find_latest_valid(st).step == 1
    step, model = _restore(url)
    assert step == 1 and torch.equal(model.bias.detach(), torch.full((3,), 1.0))


def test_a_run_resumed_from_format1_writes_format2(tmp_path):
    url = _format1_copy(tmp_path)
    model = torch.nn.Linear(4, 3)
    with spotrun.Checkpointer(url, model=model, every_steps=1, keep_last=5, async_save=False,
                              handle_signals=False, watchers=[]) as ck:
        assert ck.restore() == 2
        for _ in ck.range(3):
            pass
    st = Storage(url)
    versions = {c.step: c.manifest.format_version for c in list_checkpoints(st)}
    assert versions == {1: 1, 2: 1, 3: 2}
    assert json.loads(Path(url, checkpoint_dir(3), MANIFEST).read_text())["files"][
        "rank-00000.pt"]["crc32c"]
    assert find_latest_valid(st).step == 3


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice is Linux's")
def test_checksum_threads_run_at_the_submitting_threads_priority():
    """The background writer runs at nice 10 so training wins the CPU; its checksum threads
    must too (and a restore's, on the training thread, must not be slowed by that)."""
    import threading

    base = checksum._nice()
    seen = {}

    def background():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), base + 10)
        seen["writer"] = checksum.pool().submit(checksum._nice).result()

    checksum.pool().submit(checksum._nice).result()  # a pool exists already, made at `base`
    t = threading.Thread(target=background)
    t.start()
    t.join()
    assert seen["writer"] == base + 10
    assert checksum.pool().submit(checksum._nice).result() == base
