"""Name -> class registries filled by the ``dpo_register_*`` hooks.

Every claim on a name is kept, so that a clash can be shown (``dpo plugins``, ``dpo backends``)
and resolved by one rule instead of by install order:

* a name claimed by one plugin means that plugin's class;
* a name claimed by several plugins (a clash) is refused when the user names it (``--loss``,
  ``--backend``, ``--stop``, ``--format``, a config file's key, an ``-o`` section): the error names
  both plugins. ``get(name)`` asks on the user's behalf. The names a resumed run recorded in
  ``run.json`` count as not named: the run started with whatever served them then;
* when nobody named it (a default such as loss ``dpo`` or stopping policy ``nan-guard``, a
  candidate of ``--backend auto``, format detection), the built-in claim wins if exactly one
  claimant is built in, with a warning line naming the plugin that was passed over
  (``get(name, asked=False)`` and iteration); with no built-in among the claimants the name stays
  refused, and detection skips it.

A plugin that fails at any hook is withdrawn from every registry (``withdraw``); asking for a name
only it provided says so, instead of calling the name unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, TypeVar

from dpo.core.interfaces.errors import DuplicateNameError, UnknownNameError, UsageError, warn_on_stderr

T = TypeVar("T")


@dataclass(frozen=True)
class Claim:
    """One plugin's class for one name."""

    cls: type
    provider: str
    builtin: bool


@dataclass(frozen=True)
class Clash:
    """A name claimed by several plugins, and what it means when nobody names it."""

    kind: str
    name: str
    providers: tuple[str, ...]
    builtin: str | None  # the built-in claimant that serves when nobody names it, if one

    def error(self) -> DuplicateNameError:
        return DuplicateNameError(self.kind, self.name, self.providers[0], self.providers[1])

    def __str__(self) -> str:
        serves = (f"unless named, the built-in one (plugin {self.builtin!r}) is used"
                  if self.builtin else "it cannot be used until one is removed")
        return f"{self.error()}; {serves}"


@dataclass
class Registry(Generic[T]):
    """Classes of one kind keyed by their ``name`` attribute, remembering who registered each."""

    kind: str
    base: type
    claims: dict[str, list[Claim]] = field(default_factory=dict)
    # name -> (plugin, why): names whose only provider failed and was withdrawn
    withdrawn: dict[str, tuple[str, str]] = field(default_factory=dict)
    warn: Callable[[str], None] = field(default=warn_on_stderr, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)

    def add(self, cls: type[T], provider: str, builtin: bool = False) -> None:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(
                f"plugin {provider!r} registered {cls!r} as a {self.kind}, "
                f"but it is not a subclass of {self.base.__module__}.{self.base.__name__}"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"plugin {provider!r}: {cls.__name__} has no string class attribute 'name'")
        check = getattr(cls, "registration_problem", None)
        problem = check() if callable(check) else None
        if problem:
            raise TypeError(f"plugin {provider!r}: {self.kind} {cls.__name__}: {problem}")
        claims = self.claims.setdefault(name, [])
        if any(c.provider == provider for c in claims):
            raise ValueError(f"plugin {provider!r} registered {self.kind} {name!r} twice")
        claims.append(Claim(cls, provider, builtin))
        claims.sort(key=lambda c: not c.builtin)  # built-ins first in messages and listings

    def withdraw(self, provider: str, why: str) -> None:
        """Forget every class ``provider`` registered; names left without a provider remember
        why, for the error when someone asks for them."""
        for name, claims in list(self.claims.items()):
            kept = [c for c in claims if c.provider != provider]
            if len(kept) == len(claims):
                continue
            if kept:
                self.claims[name] = kept
            else:
                del self.claims[name]
                self.withdrawn[name] = (provider, why)

    def clashes(self) -> list[Clash]:
        return [Clash(self.kind, name, tuple(c.provider for c in claims),
                      w.provider if (w := self._default(name)) else None)
                for name, claims in sorted(self.claims.items()) if len(claims) > 1]

    def _default(self, name: str) -> Claim | None:
        """The claim that serves ``name`` when nobody named it: the only one, or the only
        built-in one among several; None when there is none or no rule picks one."""
        claims = self.claims.get(name, [])
        if len(claims) == 1:
            return claims[0]
        builtins = [c for c in claims if c.builtin]
        return builtins[0] if len(builtins) == 1 else None

    def _passed_over(self, name: str, winner: Claim) -> None:
        if name in self._warned or len(self.claims[name]) < 2:
            return
        self._warned.add(name)
        others = ", ".join(repr(c.provider) for c in self.claims[name] if c is not winner)
        self.warn(f"{self.kind} {name!r} is also registered by plugin {others}; using the built-in "
                  f"one, since nothing named it (naming it is an error while both are "
                  f"installed; see `dpo plugins`)")

    def get(self, name: str, *, asked: bool = True) -> type[T]:
        """The class for ``name``. ``asked``: the user named it (a clash is then an error);
        False for a name dpo picked itself (a default), where a built-in claim wins a clash."""
        claims = self.claims.get(name)
        if not claims:
            if name in self.withdrawn:
                plugin, why = self.withdrawn[name]
                raise UsageError(f"{self.kind} {name!r} comes from plugin {plugin!r}, which failed "
                                 f"({why}); fix or uninstall it, see `dpo plugins`")
            raise UnknownNameError(self.kind, name, list(self.claims))
        if len(claims) == 1:
            return claims[0].cls
        winner = None if asked else self._default(name)
        if winner is None:
            raise Clash(self.kind, name, tuple(c.provider for c in claims), None).error()
        self._passed_over(name, winner)
        return winner.cls

    @property
    def providers(self) -> dict[str, str]:
        """name -> the plugin whose class serves it when nobody names it (for a clash that no
        rule resolves, the first claimant)."""
        return {name: (self._default(name) or claims[0]).provider
                for name, claims in sorted(self.claims.items())}

    def names(self) -> list[str]:
        return sorted(self.claims)

    def __contains__(self, name: object) -> bool:
        return name in self.claims

    def __iter__(self) -> Iterator[tuple[str, type[T]]]:
        """(name, class) in name order, as when nobody names them: a clash yields its built-in
        class (with the warning) or nothing."""
        for name in sorted(self.claims):
            winner = self._default(name)
            if winner is not None:
                self._passed_over(name, winner)
                yield name, winner.cls
