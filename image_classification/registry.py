"""Named choices that a flag selects: optimizers, LR schedules, data backends and formats, augmentation policies,
inference engines, training features. Adding one is one entry; the flag's `choices=` and its error message
come from the registry.

    OPTIMIZERS = Registry("optimizer", flag="--optimizer")

    @OPTIMIZERS.register("sgd")
    def sgd(groups, config): ...

    OPTIMIZERS.names()           # ("sgd", ...), in registration order: the flag's choices
    OPTIMIZERS.get("adam")       # UserError: unknown --optimizer 'adam'; choose from sgd, rmsprop

An entry may also be a "module:attribute" string, imported when first looked up: a registry can list what lives
in modules it must not import (a heavy dependency such as DALI, or a layer above it) without importing them.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .cli import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object (or "module:attribute" reference), in registration order."""

    def __init__(self, kind: str, flag: str | None = None) -> None:
        self.kind = kind
        self.flag = flag
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, entry: T | str | None = None) -> Callable[[T], T] | T | str:
        """Add `entry` under `name`; without `entry`, a decorator that adds what it decorates."""
        if entry is not None:
            self._add(name, entry)
            return entry

        def decorate(obj: T) -> T:
            self._add(name, obj)
            return obj
        return decorate

    def _add(self, name: str, entry: T | str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order (a flag's choices)."""
        return tuple(self._entries)

    def get(self, name: str) -> T:
        """The entry of `name` (imported now if it is a reference), or a UserError listing the choices."""
        if name not in self._entries:
            what = self.flag or self.kind
            raise UserError(f"unknown {what} {name!r}; choose from {', '.join(self._entries)}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = getattr(importlib.import_module(module), attribute)
            self._entries[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
