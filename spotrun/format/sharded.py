"""Sharded checkpoints (FSDP2, FSDP1 sharded state dicts, tensor parallel) through PyTorch's DCP.

``torch.distributed.checkpoint`` (DCP) does the planning, deduplication and resharding; this
module only moves its bytes through spotrun's :class:`~spotrun.storage.Storage`, so local
disk, ``s3://`` and ``memory://`` URLs all get spotrun's atomic writes, S3 multipart
uploads, retries and hashing on the way out. Nothing here writes a manifest: DCP's files,
``.metadata`` included, are ordinary payload, and the caller commits spotrun's manifest last.

Layout of one sharded checkpoint (DCP's own names, so ``dcp.load`` with a plain
``FileSystemReader`` can read a local copy too)::

    000000000100/
      __0_0.distcp      rank 0's shards (one file per rank)
      __0_1.distcp      what every rank reads that DCP gave rank 0 to write: non-tensor values,
                        unsharded tensors such as AdamW's step (small; not every rank has one)
      __1_0.distcp      rank 1's shards
      ...
      .metadata         DCP's index (written by rank 0 after every rank has written)
      manifest.json     spotrun's commit, written by the caller, last

Call order for a synchronous save (every rank, the same calls in the same order)::

    state = get_state(model, optimizer)                      # sharded state, no gather
    files = write_sharded(storage, step, state)              # collective
    if rank == 0:                                            # files lists EVERY rank's files
        commit(storage, Manifest(step, dict(files), world_size=world))

Asynchronous save (at most one in flight per :class:`ShardedSaver`)::

    saver = ShardedSaver(storage)            # training thread, all ranks: makes a gloo group
    state = saver.state(model, optimizer)    # get_state, built on the first save only
    staged = saver.stage(state)              # training thread: the copy into reused buffers
    future = saver.write_async(step, staged) # background thread; no default-group collective
    ...                                      # training goes on, its all_reduces included
    files = future.result()                  # next step: rank 0 commits the manifest

Restore on any number of ranks (DCP reshards)::

    metadata = read_metadata(storage, manifest)          # DCP's index, verified
    init_optimizer_state(model, optimizer, metadata)     # optional (spotrun.format.optim_init)
    state = get_state(model, optimizer)      # the NEW topology's (empty) sharded state
    read_sharded(storage, manifest, state, metadata=metadata)  # loads in place, verifies
    set_state(model, optimizer, state)

``init_optimizer_state`` gives a fresh optimizer its state, sized from the index, so that
``get_state`` does not make it with a full optimizer step over zero gradients (see there).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import mmap
import os
import pickle
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._state_dict_utils import (
    _check_state_dict_similarity,
    _copy_state_dict,
    _create_cpu_state_dict,
)
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import (
    StorageReader,
    StorageWriter,
    WriteResult,
)
from torch.distributed.checkpoint.utils import _DistWrapper
from torch.distributed.tensor import DTensor
from torch.futures import Future

from ..errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    SaveError,
    StorageError,
    StorageNotFoundError,
)
from ..records.layout import DCP_METADATA, MANIFEST, checkpoint_dir
from ..storage import Storage, translate_errors
from . import checksum
from .manifest import FileEntry, Manifest
from .tensorfile import tensor_in, value_in

__all__ = [
    "DCP_METADATA",
    "ShardedSaver",
    "get_state",
    "is_sharded",
    "is_sharded_checkpoint",
    "loads_without_collectives",
    "local_nbytes",
    "read_full",
    "read_metadata",
    "read_sharded",
    "set_state",
    "write_sharded",
]

log = logging.getLogger(__name__)

_SUFFIX = ".distcp"
# WriteResults whose index starts with this carry one written file's (name, manifest entry)
# from a rank to the coordinator; finish() takes them out before DCP's metadata is written.
_FILE_RECORD_FQN = "__spotrun_file__/"
# Files one rank reads at once on restore (a resharded rank reads a few ranks' files).
_READ_THREADS = 8
# Local files at least this large are memory-mapped on restore instead of read.
_MAP_MIN = 1 << 20
# Fault the mapped pages in at once (one call) rather than one fault per page later.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


# -- what is sharded -------------------------------------------------------------------


def _holds_sharded(obj: Any) -> bool:
    if isinstance(obj, (DTensor, ShardedTensor)):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_sharded(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_sharded(v) for v in obj)
    return False


def is_sharded(obj_or_state: Any) -> bool:
    """True when a model's, optimizer's or state dict's tensors include DTensors or
    ShardedTensors (FSDP2, FSDP1 with sharded state dicts, tensor parallel).

    A module is checked through its parameters and buffers (no state dict is built); an
    optimizer through its per-parameter state and its parameters (a fresh optimizer has no
    state yet, but its parameters are the model's DTensors); anything else is walked as a
    nested state dict.
    """
    if isinstance(obj_or_state, torch.nn.Module):
        return any(isinstance(t, DTensor) for t in obj_or_state.parameters()) or any(
            isinstance(t, DTensor) for t in obj_or_state.buffers()
        ) or _fsdp1_sharded(obj_or_state)
    if isinstance(obj_or_state, torch.optim.Optimizer):
        params = (p for g in obj_or_state.param_groups for p in g["params"])
        return any(isinstance(p, DTensor) for p in params) or _holds_sharded(
            list(obj_or_state.state.values())
        )
    return _holds_sharded(obj_or_state)


def _fsdp1_sharded(module: torch.nn.Module) -> bool:
    # FSDP1 keeps flat parameters as plain tensors; only its state dict type says whether
    # its state dict is sharded (ShardedTensors/DTensors), and building one is collective.
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
        from torch.distributed.fsdp import StateDictType
    except ImportError:  # pragma: no cover - torch without FSDP
        return False
    return any(isinstance(m, FSDP1)
               and getattr(m, "_state_dict_type", None) == StateDictType.SHARDED_STATE_DICT
               for m in module.modules())


def loads_without_collectives(model: torch.nn.Module | None) -> bool:
    """Whether :func:`get_state`, :func:`read_sharded` (``agree=False``, DCP's default
    planner) and :func:`set_state` of ``model`` run on each rank alone, no collective: true
    for DTensor state (FSDP2, tensor parallel: each rank's shards are its own, the default
    options gather nothing); false for FSDP1, whose sharded state dicts are built and
    loaded collectively."""
    return model is None or not _fsdp1_sharded(model)


def is_sharded_checkpoint(manifest: Manifest) -> bool:
    """True when a committed checkpoint was written through DCP (it lists ``.metadata``)."""
    return manifest.sharded


# -- getting and setting the state -----------------------------------------------------


def _optimizer_list(optimizers: Any) -> list[torch.optim.Optimizer]:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    return list(optimizers)


def get_state(
    model: torch.nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    *,
    options: StateDictOptions | None = None,
) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` through ``torch.distributed.checkpoint.state_dict``.

    The default options keep the state sharded (each rank holds only its own shards, no
    gather), which is what lets DCP write ranks in parallel and reshard on load. Before the
    first optimizer step DCP initialises the optimizer's state (zero moments), so a freshly
    built model and optimizer give a state dict of the right shapes to load into.
    Collective when the model is sharded: call it on every rank.
    """
    opts = _optimizer_list(optimizers)
    model_sd, optim_sd = get_state_dict(model, opts, options=options or StateDictOptions())
    state: dict[str, Any] = {"model": model_sd}
    if opts:
        state["optim"] = optim_sd
    return state


def set_state(
    model: torch.nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None,
    state: Mapping[str, Any],
    *,
    options: StateDictOptions | None = None,
) -> None:
    """Put a state from :func:`get_state` (after :func:`read_sharded`) back into the objects."""
    opts = _optimizer_list(optimizers)
    set_state_dict(
        model,
        opts,
        model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}) if opts else {},
        options=options or StateDictOptions(),
    )


# -- DCP storage writer over spotrun's Storage -----------------------------------------


def _read_by_every_rank(item: Any) -> bool:
    """Whether every rank needs ``item`` on any restore (any world size): a non-tensor
    value, or a tensor saved whole (not a shard of a larger one)."""
    if item.type == WriteItemType.BYTE_IO:
        return True
    data = item.tensor_data
    if data is None:
        return False
    chunk = data.chunk
    return all(o == 0 for o in chunk.offsets) and tuple(chunk.sizes) == tuple(data.size)


@dataclasses.dataclass(frozen=True)
class _FileRecord:
    name: str
    entry: FileEntry


class SpotrunStorageWriter(StorageWriter):
    """A DCP ``StorageWriter`` that writes one checkpoint folder through spotrun's Storage.

    DCP calls it in this order (``dcp.save``; every rank unless noted):

    0) ``reset()``
    1) ``set_up_storage_writer(is_coordinator, rank=...)``
    2) ``prepare_local_plan(plan)``
    3) (coordinator) ``prepare_global_plan(plans)``: gives rank ``i`` the file ``__i_0.distcp``
    4) ``write_data(plan, planner)``: one file per rank, written all-or-nothing and hashed as
       it goes out; besides DCP's WriteResults it returns one record per file it wrote
    5) (coordinator) ``finish(metadata, results)``: takes the file records out of the
       gathered results, writes ``.metadata`` the same way, keeps every file's entry

    Afterwards :attr:`files` holds ``[(name, FileEntry)]``: every rank's files and
    ``.metadata`` on the coordinator, this rank's own file(s) elsewhere.
    """

    def __init__(self, storage: Storage, step: int) -> None:
        super().__init__()
        self.storage = storage
        self.folder = checkpoint_dir(step)
        self.is_coordinator = False
        self.rank = 0
        self.save_id = uuid.uuid4().hex
        self.files: list[tuple[str, FileEntry]] = []

    def reset(self, checkpoint_id: Any = None) -> None:
        # The folder comes from the step, not from DCP's checkpoint_id.
        self.save_id = uuid.uuid4().hex
        self.files = []

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0) or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [
            dataclasses.replace(plan, storage_data=_StoragePrefix(f"__{i}_"))
            for i, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix = plan.storage_data.prefix if plan.storage_data is not None else f"__{self.rank}_"
        # This rank's shards in __<rank>_0.distcp (always written); the items every rank
        # reads on any restore in a small __<rank>_1.distcp: non-tensor values (learning
        # rates, optimizer settings) and whole, unsharded tensors (AdamW's per-parameter
        # ``step``, replicated buffers), which DCP's dedup spreads over the ranks. Kept
        # among the shards, they made every rank read every other rank's whole shard file
        # to find a few scalars; apart, a rank reads its own shards and a few KiB of the
        # others'. DCP's own readers find each item by the file named in .metadata, so they
        # read the layout as well.
        # A rank with no shards at all (one rank, or a replicated state) keeps its tensors
        # in __<rank>_0: every rank reads everything then, and one file is one read.
        own = [wi for wi in plan.items if not _read_by_every_rank(wi)] or [
            wi for wi in plan.items if wi.type != WriteItemType.BYTE_IO]
        mine = {id(wi) for wi in own}
        shared = [wi for wi in plan.items if id(wi) not in mine]
        results: list[WriteResult] = []
        self.files = []
        for name, items in ((f"{prefix}0{_SUFFIX}", own),
                            (f"{prefix}1{_SUFFIX}", shared)):
            if not items and name.endswith(f"1{_SUFFIX}"):
                continue
            with self.storage.open_write(f"{self.folder}/{name}") as out:
                for item in items:
                    offset = out.size
                    self._write_item(out, planner.resolve_data(item), item)
                    length = out.size - offset
                    results.append(WriteResult(index=item.index, size_in_bytes=length,
                                               storage_data=_StorageInfo(name, offset, length)))
            self.files.append((name, out.entry))
            results.append(WriteResult(index=MetadataIndex(_FILE_RECORD_FQN + name),
                                       size_in_bytes=out.size,
                                       storage_data=_FileRecord(name, out.entry)))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    @staticmethod
    def _write_item(out: Any, data: Any, item: Any) -> None:
        if item.type == WriteItemType.BYTE_IO:
            out.write(data.getbuffer())
            return
        tensor = data.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        # torch.save writes a view's whole storage: save only the view's bytes.
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        # Serialised in memory first, then one write: torch.save alone makes dozens of
        # small writes per tensor, each hashed inline; one large write hashes on a helper
        # thread while the bytes go to storage.
        buf = io.BytesIO()
        torch.save(tensor, buf)
        out.write(buf.getbuffer())
        del buf

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage_md: dict[MetadataIndex, Any] = {}
        files: list[tuple[str, FileEntry]] = []
        for rank_results in results:
            for wr in rank_results:
                if isinstance(wr.storage_data, _FileRecord):
                    rec = wr.storage_data
                    files.append((rec.name, rec.entry))
                else:
                    storage_md[wr.index] = wr.storage_data
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        with self.storage.open_write(f"{self.folder}/{DCP_METADATA}") as out:
            pickle.dump(metadata, out)
        files.append((DCP_METADATA, out.entry))
        self.files = sorted(files)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.storage.display(self.folder), save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False  # never picked automatically by DCP: spotrun passes it explicitly


# -- DCP storage reader over spotrun's Storage -----------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only the classes it is made of.

    DCP writes its index with pickle; a plain ``pickle.load`` of a file from a bucket would
    run whatever code the file names. This allows DCP's metadata dataclasses, torch's
    sizes, dtypes and layouts, and a few containers, and refuses everything else.
    """

    _MODULES = frozenset({
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "torch.distributed.checkpoint.planner",
    })
    _ALLOWED = frozenset({
        ("collections", "OrderedDict"),
        ("torch", "Size"),
        ("torch", "device"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        # Looks a layout up by name among torch's layouts (TensorProperties uses it).
        ("torch.serialization", "_get_layout"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


class SpotrunStorageReader(StorageReader):
    """A DCP ``StorageReader`` over spotrun's Storage that checks every file it reads
    against the manifest (size and chunk checksums) before a byte of it is used.

    DCP calls it in this order (``dcp.load``; every rank unless noted):

    0) ``reset()``
    1) ``read_metadata()``: the ``.metadata`` that :func:`read_sharded` already read and
       verified (read up front because DCP turns a failure there into a generic error)
    2) ``set_up_storage_reader(metadata, is_coordinator)``
    3) ``prepare_local_plan(plan)``, then (coordinator) ``prepare_global_plan(plans)``
    4) ``read_data(plan, planner)``: each needed file is read whole, verified, then sliced
       into the planner's tensors (DCP narrows saved shards to this rank's new shards)
    """

    def __init__(self, storage: Storage, manifest: Manifest, *, weights_only: bool = True,
                 metadata: Metadata | None = None) -> None:
        super().__init__()
        self.storage = storage
        self.manifest = manifest
        self.weights_only = weights_only
        self.folder = checkpoint_dir(manifest.step)
        self.load_id = uuid.uuid4().hex
        # ``metadata``: this checkpoint's index as read_metadata already read and verified it.
        self.metadata = self._load_metadata() if metadata is None else metadata
        self.storage_data: dict[MetadataIndex, Any] = {}

    def read_verified(self, name: str) -> Any:
        """The bytes of one file of the checkpoint (a buffer), or CorruptCheckpointError
        when it is missing, unlisted, or differs from the manifest (StorageError for
        access errors). A file on local disk (the run folder, or this machine's copy) is
        memory-mapped, not read: the checksums and the tensors' copies read the page
        cache directly."""
        rel = f"{self.folder}/{name}"
        where = self.storage.display(rel)
        entry = self.manifest.files.get(name)
        if entry is None:
            raise CorruptCheckpointError(
                f"{where}: not listed in the manifest of step {self.manifest.step}; the "
                "checkpoint is damaged, restore from an older one"
            )
        try:
            data = self._mapped(rel, where, entry.size)
            if data is None:
                data = self.storage.read_bytes(rel)
        except StorageNotFoundError:
            # A missing file under a readable manifest is damage; a missing bucket or
            # folder (the manifest gone too) is an access problem and stays a StorageError.
            if self.storage.exists(f"{self.folder}/{MANIFEST}"):
                raise CorruptCheckpointError(
                    f"{where}: missing although the manifest of step {self.manifest.step} "
                    "lists it; restore from an older checkpoint"
                ) from None
            raise
        verified = getattr(self.storage, "verified", None)  # a nearest-copy reader checked it
        if verified is not None and len(data) == entry.size and verified(rel):
            return data
        found = checksum.problem(data, entry)
        if found:
            raise CorruptCheckpointError(f"{where}: {found}; restore from an older checkpoint")
        return data

    def _mapped(self, rel: str, where: str, size: int) -> memoryview | None:
        """``rel`` mapped read-only and prefaulted, when it is a local file of the listed
        size (other sizes go through the read, whose check names the mismatch)."""
        local = self.storage.local_path(rel) if size >= _MAP_MIN else None
        if local is None:
            return None
        with translate_errors(where, "reading"), open(local, "rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                return None
            # The map lives as long as the view and the tensors made over it.
            return memoryview(mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | _POPULATE,
                                        prot=mmap.PROT_READ))

    def _load_metadata(self) -> Metadata:
        raw = self.read_verified(DCP_METADATA)
        try:
            metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{self.storage.display(f'{self.folder}/{DCP_METADATA}')}: unreadable DCP "
                f"metadata ({exc}); restore from an older checkpoint"
            ) from exc
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpointError(
                f"{self.storage.display(self.folder)}: .metadata holds a "
                f"{type(metadata).__name__}, not DCP metadata; restore from an older checkpoint"
            )
        return metadata

    def reset(self, checkpoint_id: Any = None) -> None:
        self.load_id = uuid.uuid4().hex

    def read_metadata(self) -> Metadata:  # no **kwargs: no fallback to rank-local metadata
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool,
                              *args: Any, **kwargs: Any) -> None:
        self.storage_data = dict(metadata.storage_data or {})

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            info: _StorageInfo = self.storage_data[item.storage_index]
            per_file.setdefault(info.relative_path, []).append(item)
        # Every file this rank needs is read and verified at once, in parallel (reads and
        # checksums release the GIL; on S3 each large read is itself ranged parallel GETs).
        # All of them are verified before a byte is copied into the state, so a damaged
        # file leaves the live model and optimizer untouched for the fallback to an older
        # checkpoint.
        names = sorted(per_file)
        data = _read_all(self.read_verified, names)
        for name in names:
            self._load_items(memoryview(data.pop(name)), per_file[name], planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _load_items(self, data: memoryview, items: list[Any],
                    planner: LoadPlanner) -> None:
        with warnings.catch_warnings():
            # The tensors are read-only views of the verified bytes, only ever copied from
            # (torch warns about the read-only buffer once per process).
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            self._load_each(data, items, planner)

    def _load_each(self, data: memoryview, items: list[Any], planner: LoadPlanner) -> None:
        for item in items:
            info = self.storage_data[item.storage_index]
            if info.transform_descriptors:
                raise IncompatibleCheckpointError(
                    f"{self.storage.display(self.folder)}: DCP storage transforms "
                    f"{info.transform_descriptors} are not supported by spotrun's reader"
                )
            if item.type == LoadItemType.BYTE_IO:
                self._load_value(data[info.offset:info.offset + info.length], item, planner)
                continue
            view = data[info.offset:info.offset + info.length]
            tensor = tensor_in(view)
            if tensor is None:  # not the layout torch.save writes today: the general path
                tensor = torch.load(io.BytesIO(view), map_location="cpu", weights_only=True)
            tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
            target = planner.resolve_tensor(item).detach()
            if target.size() != tensor.size():
                raise IncompatibleCheckpointError(
                    f"{self.storage.display(self.folder)}: {item.storage_index.fqn} has "
                    f"shape {tuple(tensor.size())} in the checkpoint, "
                    f"{tuple(target.size())} here; load into the same model"
                )
            target.copy_(tensor)
            planner.commit_tensor(item, target)

    def _load_value(self, raw: memoryview, item: Any, planner: LoadPlanner) -> None:
        """Give a non-tensor value to the planner. DCP's planners load it with
        ``weights_only=False`` (any code the pickle names would run): unless asked not to,
        it is loaded here with ``weights_only=True``, then put straight into DCP's default
        planner's state (what its ``load_bytes`` does), or handed to another planner
        re-saved, so what that one unpickles was made by ``torch.save`` from a safe load."""
        if not self.weights_only:
            planner.load_bytes(item, io.BytesIO(raw))
            return
        value = self._safe_value(raw, item.storage_index.fqn)
        if type(planner).load_bytes is DefaultLoadPlanner.load_bytes:
            assert isinstance(planner, DefaultLoadPlanner)
            fqn = item.dest_index.fqn
            if planner.flatten_state_dict:
                set_element(planner.original_state_dict, planner.mappings[fqn], value)
            else:
                planner.state_dict[fqn] = value
            return
        out = io.BytesIO()
        torch.save(value, out)
        out.seek(0)
        planner.load_bytes(item, out)

    def _safe_value(self, raw: memoryview, fqn: str) -> Any:
        """``torch.load(weights_only=True)`` of a non-tensor value's bytes (a short cut for
        the plain values DCP writes), with spotrun's errors."""
        try:
            plain, value = value_in(raw)
            if not plain:
                value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(
                f"{self.storage.display(self.folder)}: the value {fqn!r}: safe loading "
                f"(weights_only=True) refused it: {first}; if you trust this storage, pass "
                "weights_only=False"
            ) from exc
        except (RuntimeError, EOFError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"{self.storage.display(self.folder)}: the value {fqn!r} cannot be read "
                f"({exc}); restore from an older checkpoint"
            ) from exc
        return value

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def read_metadata(storage: Storage, manifest: Manifest) -> Metadata:
    """A committed sharded checkpoint's DCP index (``.metadata``), verified against
    ``manifest`` and unpickled safely: every saved key with its global size and dtype.
    Pass it on to :func:`read_sharded` (``metadata=``), which then does not read it again.
    Raises CorruptCheckpointError / StorageError as :func:`read_sharded` does."""
    return SpotrunStorageReader(storage, manifest).metadata


def _read_all(read: Any, names: list[str]) -> dict[str, Any]:
    """``{name: read(name)}``, the reads in parallel; the first error (in name order)."""
    if len(names) <= 1:
        return {name: read(name) for name in names}
    pool = _read_pool()
    futures = [(name, pool.submit(read, name)) for name in names]
    try:
        return {name: f.result() for name, f in futures}
    finally:
        for _, f in futures:
            f.cancel()


_pool_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _read_pool() -> concurrent.futures.ThreadPoolExecutor:
    # One pool for the process, its threads kept: starting threads on every restore costs
    # milliseconds each on a busy machine. Only whole-file reads run on it (they may use
    # the checksum pool inside, never this one), so it cannot deadlock on itself.
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=_READ_THREADS, thread_name_prefix="spotrun-dcp-read")
        return _pool


# -- errors out of DCP -----------------------------------------------------------------


def _rank_errors(exc: CheckpointException) -> list[tuple[int, BaseException]]:
    out = []
    for rank, wrapped in sorted(exc.failures.items()):
        err = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        out.append((rank, err))
    return out


# The class every rank raises when ranks failed differently: the first that matches.
_AGREED = (CorruptCheckpointError, IncompatibleCheckpointError, StorageError, CheckpointError)


def _reraise_load(exc: CheckpointException) -> None:
    """DCP gathers every rank's failure into one CheckpointException on all ranks; raise
    spotrun's class for it, so every rank takes the same decision (fall back or stop)."""
    errors = _rank_errors(exc)
    for cls in _AGREED:
        for rank, err in errors:
            if isinstance(err, cls):
                raise type(err)(f"rank {rank}: {err}") from exc
    rank, err = errors[0] if errors else (-1, exc)
    raise IncompatibleCheckpointError(
        f"rank {rank}: loading the sharded checkpoint failed ({type(err).__name__}: {err}); "
        "check that the model and optimizer match the ones that saved it"
    ) from exc


@contextlib.contextmanager
def _quiet_single_process(use_dist: bool) -> Iterator[None]:
    # Without a process group DCP warns that it assumes one process: that is the intent here.
    if use_dist:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


# -- writing ---------------------------------------------------------------------------


def write_sharded(
    storage: Storage,
    step: int,
    state_dict: dict[str, Any],
    *,
    process_group: dist.ProcessGroup | None = None,
    planner: SavePlanner | None = None,
) -> list[tuple[str, FileEntry]]:
    """Write ``state_dict`` (sharded or not) as DCP files into ``checkpoint_dir(step)``.

    Collective over ``process_group`` (default: the default group): every rank calls it,
    every rank writes its own shards in parallel, rank 0 of the group writes ``.metadata``
    last, and it returns on every rank only when all of that is durable. Returns
    ``[(name, FileEntry)]`` for every file of the checkpoint on the group's rank 0 (the
    rank that commits the manifest), this rank's own file elsewhere. Raises
    :class:`~spotrun.errors.SaveError` on every rank when any rank failed; the previous
    checkpoint is untouched (nothing is committed).

    Replicated tensors (DDP, plain tensors) are written once, by DCP's dedup planner.
    """
    writer = SpotrunStorageWriter(storage, step)
    use_dist = dist.is_available() and dist.is_initialized()
    try:
        with _quiet_single_process(use_dist):
            dcp.save(state_dict, storage_writer=writer, planner=planner,
                     process_group=process_group, no_dist=not use_dist)
    except CheckpointException as exc:
        raise _save_error(storage, step, exc) from exc
    return writer.files


@dataclasses.dataclass(frozen=True)
class _SavePlanCache:
    """One save's DCP plan, kept for the next save of a state with the same layout:
    this rank's final plan, and on the coordinator the checkpoint's metadata (what
    ``.metadata`` holds apart from where each item landed in its file)."""

    key: Any
    plan: SavePlan
    metadata: Metadata | None


def _layout_key(state: Any) -> tuple[Any, ...] | None:
    """Everything DCP's save plan and ``.metadata`` depend on, for every leaf of a state
    dict: its path, whether it is a DTensor, another tensor or a value, and for tensors the
    global shape, dtype, the mesh and placements (which, with this rank's place in the
    mesh, fix its chunk) and the local tensor's properties DCP records. Values (learning rates, a float step) are
    written as bytes whatever they hold, so only their place counts. None when DCP may
    plan a leaf in a way this does not see (ShardedTensor, a custom
    ``__create_write_items__``): that state is planned on every save.

    Built in the writer thread on every save; equal keys on every rank mean the plans,
    the deduplication of replicated tensors and the metadata are the same as last time."""
    parts: list[Any] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), state)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, Mapping):
            parts.append((path, "map", len(v)))
            stack.extend(((*path, str(k)), x) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            parts.append((path, type(v).__name__, len(v)))
            stack.extend(((*path, i), x) for i, x in enumerate(v))
        elif isinstance(v, DTensor):
            # The spec's fields, not DTensor's properties (those cost ~0.1 ms each here);
            # the mesh object itself (a key equal to the last compares it by identity: a
            # tuple compares identical members without calling DeviceMesh.__eq__).
            spec, loc = v._spec, v._local_tensor
            meta = spec.tensor_meta
            parts.append((path, "D", None if meta is None else tuple(meta.shape),
                          None if meta is None else meta.dtype, spec.mesh, spec.placements,
                          tuple(loc.shape), loc.dtype, loc.layout, loc.requires_grad,
                          loc.is_pinned()))
        elif isinstance(v, ShardedTensor) or hasattr(v, "__create_write_items__"):
            return None
        elif isinstance(v, torch.Tensor):
            parts.append((path, "T", tuple(v.shape), v.dtype, v.layout, v.requires_grad,
                          v.is_pinned()))
        else:
            parts.append((path, "V"))
    return tuple(parts)


def _save_error(storage: Storage, step: int, exc: CheckpointException) -> SaveError:
    """DCP's gathered failure of a sharded save (every rank's error) as one SaveError."""
    errors = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in _rank_errors(exc))
    return SaveError(
        f"sharded save of step {step} to {storage.display(checkpoint_dir(step))} failed "
        f"({errors}); the previous checkpoint is untouched, fix the cause and save again"
    )


def _write_planned(storage: Storage, step: int, state_dict: dict[str, Any],
                   process_group: dist.ProcessGroup | None, cached: _SavePlanCache | None
                   ) -> tuple[list[tuple[str, FileEntry]], _SavePlanCache]:
    """``dcp.save(state_dict)`` with DCP's default planner, its planning skipped when
    ``cached`` holds the plan of this very layout (every rank must pass one, or none).

    DCP plans every save from scratch: each rank's local plan (Python per tensor: 27-50
    ms per rank for 60 DTensors on a loaded 2-core machine), a gather of every plan to the
    coordinator, the global plan there (deduplication, metadata) and a scatter back;
    about 170 ms of a 700 ms durable write at 120 MiB on 4 ranks. With an unchanged
    layout all of it comes out the same, so a cached save goes straight to writing; the
    write, the gather of every rank's results and the coordinator's ``.metadata`` (where
    each item landed, filled in fresh) are as ``dcp.save`` does them. Failures are
    gathered like DCP's (CheckpointException on every rank, turned into SaveError).
    Returns the written files (as :func:`write_sharded`) and the plan to keep."""
    writer = SpotrunStorageWriter(storage, step)
    use_dist = dist.is_available() and dist.is_initialized()
    dw = _DistWrapper(process_group, use_dist, 0)
    planner = DefaultSavePlanner()
    metadata = None if cached is None else cached.metadata
    final: SavePlan | None = None

    def set_up() -> None:
        planner.set_up_planner(state_dict, storage_meta=writer.storage_meta(),
                               is_coordinator=dw.is_coordinator)
        writer.set_up_storage_writer(dw.is_coordinator, rank=dw.rank)

    def local_step() -> SavePlan:
        set_up()
        return writer.prepare_local_plan(planner.create_local_plan())

    def global_step(plans: list[SavePlan]) -> list[SavePlan]:
        nonlocal metadata
        plans, metadata = planner.create_global_plan(plans)
        return writer.prepare_global_plan(plans)

    def write_data() -> list[WriteResult]:
        nonlocal final
        if cached is not None:
            set_up()  # in here, so that a failure is gathered like every other
        final = planner.finish_plan(central if cached is None else cached.plan)
        return writer.write_data(final, planner).wait()

    def finish(results: list[list[WriteResult]]) -> None:
        assert metadata is not None
        # A copy: finish() fills in storage_data, which belongs to this save only.
        writer.finish(metadata=dataclasses.replace(metadata), results=results)

    try:
        with _quiet_single_process(use_dist):
            central = None if cached is not None else dw.reduce_scatter(
                "plan", local_step, global_step)
            # The coordinator's answer is None: broadcasting DCP's whole metadata back, as
            # dcp.save does, would tell the other ranks nothing they use.
            dw.all_reduce("write", write_data, finish)
    except CheckpointException as exc:
        raise _save_error(storage, step, exc) from exc
    assert final is not None
    return writer.files, _SavePlanCache(None, final, metadata)


def read_sharded(
    storage: Storage,
    manifest: Manifest,
    state_dict: dict[str, Any],
    *,
    process_group: dist.ProcessGroup | None = None,
    planner: LoadPlanner | None = None,
    weights_only: bool = True,
    agree: bool = True,
    metadata: Metadata | None = None,
) -> None:
    """Load a committed sharded checkpoint into ``state_dict`` in place, resharding.

    ``state_dict`` is this run's own (e.g. :func:`get_state` of a freshly built model on
    any number of ranks): each of its shards is filled from the overlapping parts of the
    saved shards. Each file read is checked against ``manifest`` first; non-tensor values
    are loaded with ``weights_only`` (True: a bucket is not a trusted code source).
    Collective: every rank calls it. Raises, on every rank alike: CorruptCheckpointError
    when a file is missing or differs from the manifest (fall back to an older
    checkpoint); StorageError when storage cannot be read; IncompatibleCheckpointError
    when the state does not fit (missing keys, other shapes); CheckpointError when a safe
    load refuses a value.

    With DCP's default planner (``planner=None``) each rank plans its reads alone: that
    planner's global step changes nothing, so DCP's two plan collectives and its closing
    one would only cost time (on a busy machine, most of a restore's). One agreement at
    the end makes every rank raise alike. Another planner goes through ``dcp.load``.

    ``agree=False`` (DCP's default planner only): no collective at all; this rank raises
    its own failure and the caller agrees with the other ranks afterwards (the
    Checkpointer's restore meets once per checkpoint, after every phase of it).

    ``metadata``: the checkpoint's index from :func:`read_metadata`, when the caller has
    already read it (to size the optimizer's state before building ``state_dict``).
    """
    if not is_sharded_checkpoint(manifest):
        raise IncompatibleCheckpointError(
            f"{storage.display(checkpoint_dir(manifest.step))} is not a sharded (DCP) "
            "checkpoint; restore it with the Checkpointer's replicated path"
        )
    use_dist = dist.is_available() and dist.is_initialized()
    if not agree and not _plans_locally(planner):
        raise ValueError("read_sharded(agree=False) needs DCP's default load planner: another "
                         "planner plans collectively; pass agree=True")
    if not _plans_locally(planner):
        _read_through_dcp(storage, manifest, state_dict, process_group, planner, weights_only,
                          metadata)
        return
    failure: BaseException | None = None
    try:
        reader = SpotrunStorageReader(storage, manifest, weights_only=weights_only,
                                      metadata=metadata)
        coordinator = not use_dist or dist.get_rank(process_group) == 0
        _load_locally(reader, state_dict, planner or DefaultLoadPlanner(), coordinator)
    except CheckpointError as exc:  # Corrupt, Incompatible, refused by a safe load
        failure = exc
    except StorageError as exc:
        failure = exc
    except Exception as exc:  # noqa: BLE001 - the planner's RuntimeErrors (missing keys), torch's
        failure = IncompatibleCheckpointError(
            f"{storage.display(checkpoint_dir(manifest.step))}: loading the sharded checkpoint "
            f"failed ({type(exc).__name__}: {exc}); check that the model and optimizer match "
            "the ones that saved it"
        )
        failure.__cause__ = exc
    if agree:
        _agree(failure, use_dist, process_group)
    elif failure is not None:
        raise failure


def _agree(failure: BaseException | None, use_dist: bool, process_group: Any) -> None:
    """Every rank raises the same failure, or none does, so no rank goes on into
    collectives the others have left. One all-reduce of a flag when every rank succeeded
    (no pickling); the failures are gathered only when one did not."""
    if use_dist:
        flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32,
                            device=_group_device(process_group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
        if not int(flag.item()):
            return
        failures: list[Any] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(failures, None if failure is None else (type(failure), str(failure)),
                               group=process_group)
        _raise_agreed(failures, failure)
    elif failure is not None:
        raise failure


def _group_device(process_group: Any) -> torch.device:
    """Where a tensor for a collective on ``process_group`` lives (NCCL wants the GPU)."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_agreed(failures: list[Any], mine: BaseException | None) -> None:
    """Raise, on every rank, the same class for the gathered ``(class, message)`` failures
    (this rank's own exception, with its traceback, when it has that class)."""
    found = [(rank, f) for rank, f in enumerate(failures) if f is not None]
    if not found:
        return
    for cls in _AGREED:
        hits = [(rank, f) for rank, f in found if issubclass(f[0], cls)]
        if hits:
            if isinstance(mine, cls):
                raise mine
            rank, (kind, msg) = hits[0]
            raise kind(f"rank {rank}: {msg}")
    rank, (kind, msg) = found[0]
    raise IncompatibleCheckpointError(f"rank {rank}: {kind.__name__}: {msg}")


def _plans_locally(planner: LoadPlanner | None) -> bool:
    """True for DCP's default load planner (and subclasses keeping its identity global
    step), whose plan each rank can make alone."""
    if planner is None:
        return True
    cls = type(planner)
    return isinstance(planner, DefaultLoadPlanner) \
        and cls.create_global_plan is DefaultLoadPlanner.create_global_plan \
        and cls.finish_plan is DefaultLoadPlanner.finish_plan


def _load_locally(reader: SpotrunStorageReader, state_dict: dict[str, Any],
                  planner: LoadPlanner, coordinator: bool) -> None:
    """What ``dcp.load`` does on one rank, without its collectives: Stateful values are
    loaded through their state dicts, then put back (as ``dcp.load`` does)."""
    keys = sorted(state_dict)
    plain = {k: state_dict[k].state_dict() if isinstance(state_dict[k], Stateful) else state_dict[k]
             for k in keys}
    metadata = reader.read_metadata()
    planner.set_up_planner(plain, metadata, coordinator)
    reader.set_up_storage_reader(metadata, coordinator)
    plan = reader.prepare_local_plan(planner.create_local_plan())
    plan = reader.prepare_global_plan(planner.create_global_plan([plan]))[0]
    reader.read_data(planner.finish_plan(plan), planner).wait()
    for k in keys:
        if isinstance(state_dict[k], Stateful):
            state_dict[k].load_state_dict(plain[k])
        else:
            state_dict[k] = plain[k]


def _read_through_dcp(storage: Storage, manifest: Manifest, state_dict: dict[str, Any],
                      process_group: dist.ProcessGroup | None, planner: LoadPlanner | None,
                      weights_only: bool, metadata: Metadata | None) -> None:
    """``dcp.load`` with a planner whose global step may matter (collective)."""
    use_dist = dist.is_available() and dist.is_initialized()
    reader: SpotrunStorageReader | None = None
    failure: BaseException | None = None
    try:
        reader = SpotrunStorageReader(storage, manifest, weights_only=weights_only,
                                      metadata=metadata)
    except (CorruptCheckpointError, StorageError) as exc:
        failure = exc
    # Agree before DCP's collectives, so a rank that cannot read .metadata does not leave
    # the others waiting in DCP's planning.
    _agree(failure, use_dist, process_group)
    assert reader is not None
    try:
        with _quiet_single_process(use_dist):
            dcp.load(state_dict, storage_reader=reader, planner=planner,
                     process_group=process_group, no_dist=not use_dist)
    except CheckpointException as exc:
        _reraise_load(exc)
    except RuntimeError as exc:
        # DCP's planner raises plain RuntimeErrors for keys missing from the checkpoint.
        raise IncompatibleCheckpointError(
            f"{storage.display(checkpoint_dir(manifest.step))}: {exc}; check that the model "
            "and optimizer match the ones that saved it"
        ) from exc


def read_full(storage: Storage, manifest: Manifest) -> dict[str, Any]:
    """A sharded checkpoint's whole state (every rank's shards joined), in this process.

    No process group and no model needed: DCP's index says what every tensor is. For tools
    that inspect or compare checkpoints (``spotrun check-resume``), not for training, since
    it holds the full, unsharded state in memory. Files are verified like any read.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    reader = SpotrunStorageReader(storage, manifest)
    with _quiet_single_process(False):
        try:
            return _load_state_dict_from_keys(storage_reader=reader)
        except CheckpointException as exc:
            _reraise_load(exc)
            raise  # unreachable: _reraise_load always raises


# -- async -----------------------------------------------------------------------------


class ShardedSaver:
    """Sharded saves that stage in the training thread and write in the background.

    Why a dedicated process group: ``dcp.save`` runs collectives before writing (gather
    and scatter of plans) and after (gathering every rank's results so rank 0 can write
    ``.metadata``, then a broadcast). Planning in the training thread would still leave the
    second one, and with it every file's size and checksums, for the background. Collectives
    on the default group from the background thread would interleave with the training
    thread's own (gloo matches messages by order, so that hangs or mixes up tensors), so
    every DCP collective here runs on one extra gloo group made once, in the constructor,
    as ``torch.distributed.checkpoint.async_save`` expects. gloo runs on CPU for any
    accelerator backend, and a group's collectives are ordered only within that group.

    Call order (every rank, in the same order)::

        saver = ShardedSaver(storage)          # training thread; collective (new_group)
        state = saver.state(model, optimizer)  # cached get_state (see state())
        staged = saver.stage(state)            # training thread; waits for the previous write
        fut = saver.write_async(step, staged)  # returns at once
        files = fut.result()                   # or saver.write(step, staged) in your own thread
        saver.close()

    ``stage`` copies this rank's local shards into host buffers made on the first call and
    reused while the state's structure stays the same (pinned when CUDA is available, so
    device-to-host copies are asynchronous DMA, synchronised before ``stage`` returns).
    At most one write is in flight: ``stage`` waits for the previous write to finish, since
    it would otherwise overwrite buffers that write is still reading.
    """

    def __init__(self, storage: Storage, *, process_group: dist.ProcessGroup | None = None,
                 pin_memory: bool | None = None) -> None:
        self.storage = storage
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._group: dist.ProcessGroup | None = process_group
        if process_group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        self._buffers: dict[str, Any] | None = None
        self._live: _LiveState | None = None
        self._plan: _CopyPlan | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="spotrun-dcp")
        self._in_flight: concurrent.futures.Future[list[tuple[str, FileEntry]]] | None = None
        self._lock = threading.Lock()
        self._save_plan: _SavePlanCache | None = None
        #: DCP save plans made (planning rounds run): one per state layout when unchanged.
        self.plans_made = 0

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The group every DCP collective of this saver runs on."""
        return self._group

    def wait(self) -> list[tuple[str, FileEntry]] | None:
        """Wait for the write in flight, if any; its files, or its error (SaveError)."""
        fut, self._in_flight = self._in_flight, None
        return None if fut is None else fut.result()

    def state(
        self,
        model: torch.nn.Module,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        options: StateDictOptions | None = None,
    ) -> dict[str, Any]:
        """:func:`get_state`, built once and reused while it still describes the objects.

        ``get_state_dict`` walks the modules, maps parameters to their names and rebuilds the
        optimizer's state dict on every call: after the first save that is most of what a
        sharded save would cost the training thread beyond the copy. Its tensors are views
        of the live parameters and optimizer states, so the same dict stays right while
        none of them is replaced, added or reshaped (checked on every call against each
        tensor's storage address, shape, stride and dtype; any change rebuilds it); the
        non-tensor values (learning rates, betas, a float step) are refreshed from the
        optimizer each call. Pass the result to :meth:`stage` (which then copies along a
        plan made once) or to :func:`read_sharded` (which then loads straight into the
        live tensors). Call it on every rank. Whether to rebuild is decided per rank; that
        is safe because building the state of DTensors (FSDP2, tensor parallel) with the
        default options (no full_state_dict gather) runs no collective, and FSDP1's
        ShardedTensor state, whose building does, is never cached (rebuilt on every call
        on every rank).
        """
        opts = _optimizer_list(optimizers)
        live = self._live
        if live is None or live.model is not model or live.optimizers != opts \
                or live.options is not options:
            live = self._live = _LiveState(model, opts, options)
        return live.get()

    @torch.no_grad()
    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Copy ``state_dict``'s tensors (this rank's local shards) into reused host buffers.

        Call in the training thread, on every rank. Waits for the previous write first (its
        error, if any, is raised here). Returns the staged state dict: same structure, same
        DTensor placements, host tensors, and current values of non-tensor leaves.

        A state from :meth:`state`, checked by that call, is copied along a plan made on
        the first save (pairs of source shard and buffer, no walk, no comparison): the
        training thread pays for the copy alone. Any other state is walked and compared
        with the buffers' structure each time.
        """
        self.wait()
        live = self._live
        fast = live is not None and live.state is state_dict and live.take_checked()
        plan = self._plan
        if fast and plan is not None and plan.source is state_dict:
            staged = plan.run(self.pin_memory)
        else:
            if self._buffers is None or not _same_structure(state_dict, self._buffers):
                self._buffers = _create_cpu_state_dict(state_dict, pin_memory=self.pin_memory)
            staged = _copy_state_dict(state_dict, self._buffers, non_blocking=self.pin_memory,
                                      type_check=False)
            self._plan = None
            if fast:
                try:
                    self._plan = _CopyPlan(state_dict, staged)
                except ValueError:  # not expected: the walk is the fallback, always right
                    log.debug("sharded staging: no copy plan for this state", exc_info=True)
        if self.pin_memory and torch.cuda.is_available():
            torch.cuda.synchronize()
        return staged

    def write(self, step: int, staged: dict[str, Any], *,
              storage: Storage | None = None) -> list[tuple[str, FileEntry]]:
        """Write a staged state; safe in a background thread (collectives only on the
        saver's own group). Returns what :func:`write_sharded` returns.

        ``storage``: where to write instead of the saver's own storage, for this save only
        (the Checkpointer passes the run URL teed into the machine's local copy, so a
        restart there reads its shards locally)."""
        with self._lock:
            key = _layout_key(staged)
            cached = self._save_plan
            reuse = cached is not None and key is not None and cached.key == key
            if self._group is not None:
                # Start nothing until every rank has staged. A rank whose stage ended first
                # would otherwise plan, serialise and checksum its shards while slower ranks
                # still copy theirs: where ranks share cores (CPU training, more ranks than
                # cores, a busy host) that work takes CPU from their copies, and the slowest
                # rank's stall -- the one every rank waits for at the next collective -- grew
                # to ~2x its copy (issue 24, measured on 4 ranks / 2 cores). The write cannot
                # finish before the slowest rank's plan anyway (DCP gathers every plan), so
                # waiting here, blocked in gloo, costs the write one collective: the same
                # one tells every rank whether all of them may reuse their save plan.
                flag = torch.tensor([1 if reuse else 0], dtype=torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._group)
                reuse = bool(flag.item())
            if not reuse:
                self._save_plan = None  # a failed save below must not leave a stale plan
            files, plan = _write_planned(self.storage if storage is None else storage, step,
                                         staged, self._group, cached if reuse else None)
            if not reuse and key is not None:
                self._save_plan = dataclasses.replace(plan, key=key)
                self.plans_made += 1
            return files

    def write_async(self, step: int, staged: dict[str, Any]
                    ) -> concurrent.futures.Future[list[tuple[str, FileEntry]]]:
        """Start :meth:`write` on the saver's thread; returns its future."""
        if self._in_flight is not None and not self._in_flight.done():
            raise SaveError("a sharded write is still in flight; call stage() or wait() first")
        self._in_flight = self._executor.submit(self.write, step, staged)
        return self._in_flight

    def close(self) -> None:
        """Wait for the write in flight and stop the saver's thread (the group is kept:
        destroying a group is collective and gloo tears down badly mid-exit)."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)


def local_nbytes(state: Any) -> int:
    """The bytes of this rank's tensors in a (sharded) state dict: a DTensor's local shard,
    not its global size (what this rank writes, about)."""
    total = 0
    for _, _, v in _leaves(state):
        if isinstance(v, ShardedTensor):  # FSDP1: its local shards
            total += sum(s.tensor.numel() * s.tensor.element_size() for s in v.local_shards())
        elif isinstance(v, torch.Tensor):
            total += _local(v).numel() * _local(v).element_size()
    return total


def _same_structure(state: Any, buffers: Any) -> bool:
    try:
        return bool(_check_state_dict_similarity(state, buffers))
    except Exception:  # noqa: BLE001 - any mismatch in walking means "rebuild"
        return False


# -- the cached state and copy plan (what keeps the stall at the copy) ----------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's bytes (a DTensor's local shard; else the tensor)."""
    if isinstance(t, DTensor):
        return t._local_tensor  # to_local() without the autograd bookkeeping
    return t


def _sig(t: torch.Tensor) -> tuple[Any, ...]:
    loc = t._local_tensor if isinstance(t, DTensor) else t
    return (loc.data_ptr(), loc.dtype, loc.shape, loc.stride(), t.shape)


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, Any, Any]]:
    """(container, key, value) for every leaf of a nested state dict."""
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj)
    for k, v in items:
        if isinstance(v, (Mapping, list)) and not isinstance(v, torch.Tensor):
            yield from _leaves(v, (*path, k))
        else:
            yield obj, k, v


class _LiveState:
    """:func:`get_state` of one model and its optimizers, rebuilt only when it may be stale.

    ``key()`` is cheap (a walk over parameters, buffers and optimizer states, no state dict)
    and names every tensor by its storage address, dtype, shape and stride: equal keys mean
    the cached dict's tensors are still the live ones (the cache holds their storage, so an
    address cannot be reused by another tensor while it does). The non-tensor leaves of
    the optimizer's part (param_groups' values, non-tensor per-parameter state) are copied
    from the optimizer on every :meth:`get`. A state that does not alias the live tensors
    (another state_dict implementation copies), holds ShardedTensors (FSDP1) or other
    non-tensor leaves is never cached: :meth:`get` then calls get_state each time.
    """

    def __init__(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                 options: StateDictOptions | None) -> None:
        self.model = model
        self.optimizers = optimizers
        self.options = options
        self.state: dict[str, Any] | None = None
        self.builds = 0
        self._key: tuple[Any, ...] | None = None
        self._refresh: list[tuple[Any, Any, Any, Any]] = []
        self._checked = False

    def key(self) -> tuple[Any, ...]:
        parts: list[Any] = []
        # One walk of the modules, each one's parameter and buffer slots read directly
        # (named_parameters then named_buffers walked the tree twice: half of this check's
        # cost, which is on the training thread at every save).
        for prefix, module in self.model.named_modules():
            parts.append(prefix)
            for name, t in module._parameters.items():
                parts.append((name, None if t is None else _sig(t)))
            for name, t in module._buffers.items():
                parts.append((name, None if t is None else _sig(t)))
        for opt in self.optimizers:
            # The dicts themselves too: the non-tensor values are refreshed from these very
            # objects, and optimizer.load_state_dict (a restore) replaces them with new ones.
            parts.append((id(opt.param_groups), id(opt.state)))
            for group in opt.param_groups:
                parts.append((id(group), tuple(sorted(k for k in group if k != "params"))))
                for p in group["params"]:
                    st = opt.state.get(p)
                    parts.append((id(p), id(st), None if st is None else tuple(
                        (k, _sig(v) if isinstance(v, torch.Tensor) else type(v).__name__)
                        for k, v in st.items())))
        return tuple(parts)

    def _tensors(self) -> Iterator[torch.Tensor]:
        yield from self.model.parameters()
        yield from self.model.buffers()
        for opt in self.optimizers:
            for st in opt.state.values():
                yield from (v for v in st.values() if isinstance(v, torch.Tensor))

    def get(self) -> dict[str, Any]:
        if self.state is not None and self.key() == self._key:
            for dst, k, src, sk in self._refresh:
                dst[k] = src[sk]
            self._checked = True
            return self.state
        state = get_state(self.model, self.optimizers, options=self.options)
        self.builds += 1
        # After get_state: it may have created the optimizer's state (a fresh optimizer).
        self._key = self.key()
        refresh = self._plan_refresh(state)
        self.state, self._refresh = (state, refresh) if refresh is not None else (None, [])
        self._checked = self.state is not None
        return state

    def take_checked(self) -> bool:
        """True once after each :meth:`get` that returned the cached (checked) state."""
        checked, self._checked = self._checked, False
        return checked

    def _plan_refresh(self, state: dict[str, Any]) -> list[tuple[Any, Any, Any, Any]] | None:
        """Where each non-tensor leaf of ``state`` comes from in the optimizer, or None
        when ``state`` cannot be cached (see the class docstring)."""
        live = {_sig(t)[:4] for t in self._tensors()}
        for _, _, v in _leaves(state.get("model", {})):
            if not isinstance(v, torch.Tensor) or isinstance(v, ShardedTensor) \
                    or _sig(v)[:4] not in live:
                return None
        osd = state.get("optim")
        if osd is None:
            return []
        groups = [g for opt in self.optimizers for g in opt.param_groups]
        saved_groups = osd.get("param_groups", [])
        if len(groups) != len(saved_groups):
            return None
        refresh: list[tuple[Any, Any, Any, Any]] = []
        names: list[str] = []
        params: list[Any] = []
        for group, saved in zip(groups, saved_groups, strict=True):
            if set(group) != set(saved):
                return None
            refresh += [(saved, k, group, k) for k in group if k != "params"]
            names += list(saved["params"])
            params += list(group["params"])
        if len(names) != len(params):
            return None  # tied or renamed parameters: no one-to-one map to follow
        by_name = dict(zip(names, params, strict=True))
        states = {p: st for opt in self.optimizers for p, st in opt.state.items()}
        for name, saved_state in osd.get("state", {}).items():
            live_state = states.get(by_name.get(name))
            if live_state is None or set(live_state) != set(saved_state):
                return None
            for k, v in saved_state.items():
                if isinstance(v, torch.Tensor):
                    if isinstance(v, ShardedTensor) or _sig(v)[:4] not in live:
                        return None
                elif isinstance(v, (Mapping, list)):
                    return None
                else:
                    refresh.append((saved_state, k, live_state, k))
        return refresh


class _CopyPlan:
    """The pairs (source shard, host buffer) and non-tensor leaves of one staged state,
    made on the first save of a cached state; :meth:`run` is then the copy alone."""

    def __init__(self, source: dict[str, Any], staged: dict[str, Any]) -> None:
        self.source = source
        self.staged = staged
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.values: list[tuple[Any, Any, Any]] = []
        src_leaves, dst_leaves = list(_leaves(source)), list(_leaves(staged))
        if len(src_leaves) != len(dst_leaves):
            raise ValueError("staged state has another structure")
        for (src_c, k, v), (dst_c, dk, d) in zip(src_leaves, dst_leaves, strict=True):
            if k != dk or isinstance(v, torch.Tensor) != isinstance(d, torch.Tensor):
                raise ValueError("staged state has another structure")
            if isinstance(v, torch.Tensor):
                self.pairs.append((_local(v), _local(d)))
            else:
                self.values.append((dst_c, k, src_c))

    def run(self, non_blocking: bool) -> dict[str, Any]:
        for src, dst in self.pairs:
            dst.copy_(src, non_blocking=non_blocking)
        for dst_c, k, src_c in self.values:
            dst_c[k] = src_c[k]
        return self.staged
