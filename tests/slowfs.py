"""fsspec backends that make storage slow or broken on demand, for async-save tests.

``slowfile://`` is local disk whose payload writes sleep (``SPOTRUN_TEST_WRITE_DELAY`` seconds
per write call, shared by child processes through the environment), ``slowdcp://`` the same for
DCP shard files only; ``failmem://`` is memory storage whose payload writes raise while
``FailMemFS.failing`` is set.
"""

from __future__ import annotations

import os
import time
from typing import ClassVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem


class Slowed:
    """A file whose every read or write call first sleeps ``delay`` seconds."""

    def __init__(self, raw, delay: float) -> None:
        self._raw, self._delay = raw, delay

    def read(self, *args):
        time.sleep(self._delay)
        return self._raw.read(*args)

    def write(self, data):
        time.sleep(self._delay)
        return self._raw.write(data)

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()


class SlowLocalFS(LocalFileSystem):
    protocol = ("slowfile",)
    #: Which files are slow to write: payload files only, not manifests.
    slow_marker = ".pt"

    @classmethod
    def _strip_protocol(cls, path):
        prefix = f"{cls.protocol[0]}://"
        if isinstance(path, str) and path.startswith(prefix):
            path = path[len(prefix):]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", *args, **kwargs):
        f = super()._open(path, mode, *args, **kwargs)
        delay = float(os.environ.get("SPOTRUN_TEST_WRITE_DELAY", "0"))
        if "w" in mode and delay and self.slow_marker in path:
            return Slowed(f, delay)
        return f


class SlowDcpFS(SlowLocalFS):
    """``slowdcp://``: only DCP shard files are slow, so a sharded background write stays
    in flight while everything else (rank files, manifests) is quick."""

    protocol = ("slowdcp",)
    slow_marker = ".distcp"


class FailMemFS(MemoryFileSystem):
    protocol = ("failmem",)
    failing = False
    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list] = [""]

    def _open(self, path, mode="rb", *args, **kwargs):
        if "w" in mode and FailMemFS.failing and ".pt" in path:
            raise OSError("injected storage failure")
        return super()._open(path, mode, *args, **kwargs)


def register() -> None:
    fsspec.register_implementation("slowfile", SlowLocalFS, clobber=True)
    fsspec.register_implementation("slowdcp", SlowDcpFS, clobber=True)
    fsspec.register_implementation("failmem", FailMemFS, clobber=True)
