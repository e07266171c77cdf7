"""Name → object registries for every extension point (norms, archs, datasets, ...)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedsim.errors import ScenarioError

T = TypeVar("T")


def _same_definition(old: object, new: object) -> bool:
    """Whether ``new`` is ``old`` re-executed: same qualified name in the same source file.

    A module imported twice (once by file path, once by package name, as a user's strategy
    module can be) registers its entries again; that replaces them instead of failing.
    """
    try:
        source = inspect.getsourcefile(old)  # type: ignore[arg-type]
        same_file = source is not None and source == inspect.getsourcefile(new)  # type: ignore[arg-type]
    except TypeError:
        return False
    return same_file and getattr(old, "__qualname__", None) == getattr(new, "__qualname__", 0)


class Registry(Generic[T]):
    """A named table of components filled by a decorator, looked up by short name.

    Unknown names raise :class:`ScenarioError` listing the valid ones, so a typo in a
    scenario file is reported before anything runs.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds ``obj`` under ``name`` (names are unique)."""

        def add(obj: T) -> T:
            if name in self._items and not _same_definition(self._items[name], obj):
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str, key: str | None = None) -> T:
        """Return the entry for ``name`` or raise a ScenarioError naming the options."""
        if name not in self._items:
            where = f"{key} = {name!r}" if key else f"{self.kind} {name!r}"
            near = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ScenarioError(
                f"unknown {self.kind} in {where}{hint}; choose one of: {', '.join(self.names())}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
