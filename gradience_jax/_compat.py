"""Lazy re-exports of names that moved to another module (PEP 562), in one place.

Supported names: ``lazy_exports``. A module whose names moved up a layer keeps them
reachable without importing the upper layer at import time::

    _MOVED = {"train": "gradience_jax.experiments.training"}
    __getattr__, __dir__ = lazy_exports(globals(), _MOVED)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(namespace: dict[str, Any], moved: Mapping[str, str],
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module's ``__getattr__`` and ``__dir__`` for names that live in other modules.

    Args:
        namespace: the module's ``globals()``; a resolved name is cached there.
        moved: ``name -> module path`` of its new home.

    Returns:
        ``(__getattr__, __dir__)``: the first imports the home on first use and returns
        the name (``AttributeError`` for any other name); the second lists the module's
        names and the moved ones.
    """
    module = namespace.get("__name__", "<module>")

    def __getattr__(name: str) -> Any:
        home = moved.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(moved))

    return __getattr__, __dir__
