"""Name → object registries for every extension point (norms, archs, datasets, ...)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedsim.errors import ScenarioError

T = TypeVar("T")


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
            if name in self._items:
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
