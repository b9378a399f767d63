"""Name -> class registries filled by the ``dpo_register_*`` hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from dpo.core.errors import DuplicateNameError, UnknownNameError

T = TypeVar("T")


@dataclass
class Registry(Generic[T]):
    """Classes of one kind keyed by their ``name`` attribute, remembering who registered each."""

    kind: str
    base: type
    classes: dict[str, type[T]] = field(default_factory=dict)
    providers: dict[str, str] = field(default_factory=dict)
    conflicts: dict[str, DuplicateNameError] = field(default_factory=dict)

    def add(self, cls: type[T], provider: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(
                f"plugin {provider!r} registered {cls!r} as a {self.kind}, "
                f"but it is not a subclass of {self.base.__module__}.{self.base.__name__}"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"plugin {provider!r}: {cls.__name__} has no string class attribute 'name'")
        if name in self.classes:
            # Remembered, so that using the name fails naming both plugins while every other
            # name keeps working.
            error = DuplicateNameError(self.kind, name, self.providers[name], provider)
            self.conflicts[name] = error
            raise error
        self.classes[name] = cls
        self.providers[name] = provider

    def remove(self, name: str) -> None:
        self.classes.pop(name, None)
        self.providers.pop(name, None)

    def get(self, name: str) -> type[T]:
        if name in self.conflicts:
            raise self.conflicts[name]
        try:
            return self.classes[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, list(self.classes)) from None

    def names(self) -> list[str]:
        return sorted(self.classes)

    def __contains__(self, name: object) -> bool:
        return name in self.classes

    def __iter__(self):
        return iter(sorted(self.classes.items()))
