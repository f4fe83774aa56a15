"""A named registry: the one lookup every extension point of quant uses (formats, kernels, GGUF codecs)."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Items found by name; a miss names what is known, a second registration of a name is refused.

    Args:
        kind: what the items are, for messages (``"format"`` -> ``unknown format 'x'; known formats: ...``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from a malformed document
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names()) or 'none'}"
                             ) from None

    def find(self, name: str) -> T | None:
        """The item, or ``None`` where nothing is registered under ``name``."""
        return self._items.get(name)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
