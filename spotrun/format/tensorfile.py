"""One tensor out of the bytes ``torch.save`` wrote, over those bytes (no copy), fast.

A sharded restore decodes one small ``torch.save`` archive per shard: thousands per rank
for a large model. Through ``zipfile`` and torch's weights-only unpickler each costs about
a millisecond of Python, most of a same-size restore's time beside the read itself. What
makes it cheap here:

* the archive's central directory is read with ``struct`` (names, offsets, sizes; the
  bytes were verified whole against the manifest's checksums before, so zip's own CRCs
  are not checked again);
* the small pickle that rebuilds the tensor (``data.pkl``: storage id, dtype, offset,
  shape, stride) is unpickled once per distinct pickle and remembered by its bytes: the
  shards of one model share a handful of shapes, and equal bytes unpickle to equal
  recipes (the weights-only unpickler depends on nothing else);
* the tensor is then ``torch.frombuffer`` + ``as_strided`` over the archive's storage bytes.

Anything not laid out as expected (compressed entries, several storages, a big-endian
archive, zip64 entries) returns None, and the caller uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import struct
import sys
import threading
from typing import Any

import torch

__all__ = ["tensor_in", "value_in"]

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory (22 bytes, no comment)
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes before the EOCD
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # one central directory entry (46 bytes + name...)
_LOCAL = struct.Struct("<4s5H3L2H")  # one local file header (30 bytes + name + extra)
_SAT16, _SAT32 = 0xFFFF, 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How ``data.pkl`` rebuilds its tensor from its one storage."""

    key: str
    dtype: torch.dtype
    nbytes: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


# Remembered pickles (bytes -> recipe, or None: not a plain one-storage tensor). Bounded:
# a model has few distinct shard shapes, a pathological one must not grow this forever.
_recipes: dict[bytes, _Recipe | None] = {}
_recipes_lock = threading.Lock()
_MAX_RECIPES = 4096


def tensor_in(view: memoryview) -> torch.Tensor | None:
    """The tensor ``torch.save`` wrote into ``view``, over ``view``'s own bytes (read only:
    copy it out, never write to it), or None when the archive is not laid out as expected."""
    if sys.byteorder != "little":
        return None
    try:
        entries = _entries(view)
        if entries is None:
            return None
        pkl = next((n for n in entries if n.endswith("/data.pkl")), None)
        if pkl is None:
            return None
        prefix = pkl[: -len("data.pkl")]
        order = entries.get(f"{prefix}byteorder")
        if order is not None and bytes(view[order[0]:order[0] + order[1]]) != b"little":
            return None
        start, length = entries[pkl]
        recipe = _recipe(bytes(view[start:start + length]))
        if recipe is None:
            return None
        found = entries.get(f"{prefix}data/{recipe.key}")
        if found is None or found[1] != recipe.nbytes:
            return None
        raw = view[found[0]:found[0] + recipe.nbytes]
        flat = (torch.frombuffer(raw, dtype=recipe.dtype) if recipe.nbytes
                else torch.empty(0, dtype=recipe.dtype))  # frombuffer refuses empty buffers
        return flat.as_strided(recipe.size, recipe.stride, recipe.offset)
    except (ValueError, IndexError, KeyError, RuntimeError, struct.error, UnicodeDecodeError):
        return None


def value_in(view: memoryview) -> tuple[bool, Any]:
    """``(True, value)`` for a ``torch.save`` of a value holding no tensor (a learning rate,
    betas, a flag), unpickled with torch's weights-only unpickler as
    ``torch.load(weights_only=True)`` would (its refusal, ``pickle.UnpicklingError``, is
    raised); ``(False, None)`` when the bytes are anything else (let ``torch.load`` decide)."""
    try:
        entries = _entries(view)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        return False, None
    if entries is None:
        return False, None
    pkl = next((n for n in entries if n.endswith("/data.pkl")), None)
    if pkl is None or any("/data/" in n for n in entries):
        return False, None
    from torch._weights_only_unpickler import Unpickler as WeightsOnlyUnpickler

    def no_storage(pid: Any) -> Any:
        raise pickle.UnpicklingError("a storage where no tensor was saved")

    start, length = entries[pkl]
    unpickler = WeightsOnlyUnpickler(io.BytesIO(bytes(view[start:start + length])), encoding="utf-8")
    unpickler.persistent_load = no_storage  # type: ignore[method-assign]
    return True, unpickler.load()


def _entries(view: memoryview) -> dict[str, tuple[int, int]] | None:
    """``{name: (start of its bytes, size)}`` from the central directory; None unless every
    entry is stored uncompressed and the archive is a plain (non-spanning) one."""
    n = len(view)
    if n < _EOCD.size:
        return None
    sig, disk, cd_disk, _, count, cd_size, cd_off, comment = _EOCD.unpack(view[n - _EOCD.size:])
    if sig != b"PK\x05\x06" or comment or disk or cd_disk:
        return None
    if count == _SAT16 or _SAT32 in (cd_size, cd_off):
        at = n - _EOCD.size - _ZIP64_LOCATOR.size
        lsig, _, z64_off, _ = _ZIP64_LOCATOR.unpack(view[at:at + _ZIP64_LOCATOR.size])
        if lsig != b"PK\x06\x07":
            return None
        fields = _ZIP64_EOCD.unpack(view[z64_off:z64_off + _ZIP64_EOCD.size])
        if fields[0] != b"PK\x06\x06":
            return None
        count, cd_size, cd_off = fields[-3], fields[-2], fields[-1]
    cd = view[cd_off:cd_off + cd_size]
    out: dict[str, tuple[int, int]] = {}
    pos = 0
    for _ in range(count):
        (sig, _, _, flags, method, _, _, _, csize, usize, nlen, elen, clen, _, _, _,
         local) = _CENTRAL.unpack(cd[pos:pos + _CENTRAL.size])
        if sig != b"PK\x01\x02" or method != 0 or csize != usize or _SAT32 in (usize, local):
            return None
        name = bytes(cd[pos + _CENTRAL.size:pos + _CENTRAL.size + nlen]).decode(
            "utf-8" if flags & 0x800 else "cp437")
        head = _LOCAL.unpack(view[local:local + _LOCAL.size])
        if head[0] != b"PK\x03\x04":
            return None
        start = local + _LOCAL.size + head[-2] + head[-1]
        if start + usize > cd_off:
            return None
        out[name] = (start, usize)
        pos += _CENTRAL.size + nlen + elen + clen
    return out


def _recipe(pkl: bytes) -> _Recipe | None:
    try:
        return _recipes[pkl]
    except KeyError:
        pass
    recipe = _unpickle(pkl)
    with _recipes_lock:
        if len(_recipes) >= _MAX_RECIPES:
            _recipes.clear()
        _recipes[pkl] = recipe
    return recipe


def _unpickle(pkl: bytes) -> _Recipe | None:
    """Unpickle ``data.pkl`` through torch's weights-only unpickler over a stand-in storage
    of the size it names, and read the recipe off the tensor it rebuilds."""
    from torch._weights_only_unpickler import Unpickler as WeightsOnlyUnpickler

    seen: list[tuple[str, torch.dtype, int, Any]] = []  # (key, dtype, bytes, stand-in)

    def storage(pid: Any) -> Any:
        typename, storage_type, key, _location, numel = pid
        if typename != "storage" or seen:
            raise ValueError("not one storage")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = int(numel) * torch._utils._element_size(dtype)
        # On the meta device: the shapes without allocating the bytes.
        stand_in = torch.empty(nbytes, dtype=torch.uint8, device="meta").untyped_storage()
        seen.append((str(key), dtype, nbytes, stand_in))
        return torch.storage.TypedStorage(wrap_storage=stand_in, dtype=dtype, _internal=True)

    unpickler = WeightsOnlyUnpickler(io.BytesIO(pkl), encoding="utf-8")
    unpickler.persistent_load = storage  # type: ignore[method-assign]
    try:
        tensor = unpickler.load()
    except Exception:  # noqa: BLE001 - anything unexpected: the caller's torch.load decides
        return None
    if type(tensor) is not torch.Tensor or len(seen) != 1 or tensor.is_quantized:
        return None
    key, dtype, nbytes, _ = seen[0]
    if tensor.dtype != dtype or tensor.device.type != "meta" \
            or tensor.untyped_storage().nbytes() != nbytes:
        return None
    return _Recipe(key, dtype, nbytes, tensor.storage_offset(), tuple(tensor.size()),
                   tuple(tensor.stride()))
