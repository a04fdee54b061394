"""Names a package exports but imports only on first use (PEP 562).

``import spotrun``, ``spotrun.storage`` and ``spotrun.launch`` must stay cheap: the CLI's
``--help``, the fake metadata server and a node agent waiting for its cluster file need
neither torch nor the EC2 controller. Each of those packages maps a public name to the module
that defines it and gets its ``__getattr__``/``__dir__`` from :func:`lazy_names`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, exports: Mapping[str, str], namespace: dict[str, Any]
               ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for *package*: *exports* maps a name to its module, relative to
    the package (``".local"``, ``"..records.layout"``); a loaded name is kept in *namespace*
    (the package's ``globals()``), so each is imported once."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
