"""Named entries of one kind (networks, style methods, segment sources), looked up by name.

A :class:`Registry` maps names to entries. An entry is added either by decorating it::

    MODELS = Registry("architecture")

    @MODELS.register("transformer")
    def build_transformer(config): ...

or lazily, as a ``"module:attribute"`` string that is imported the first time :meth:`Registry.get`
asks for it::

    SOURCES = Registry("segment source", lazy={"coco": "datagen.segments.coco_source:make_coco_source"})

Lazy entries let a command line list the names (``--arch``, ``--style``, ``--segments``) without
importing the heavy modules behind them (torch, timm, COCO's API). A module named by a lazy entry
may also decorate the same object with the same name: that fills the lazy entry in rather than
counting as a second registration. Any other second registration of a name is an error, so that
two plugins cannot silently replace each other.

This module is part of :mod:`datagen.format` (shared by ``datagen`` and ``trainer``) and imports
nothing but the standard library.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class _Lazy:
    """A registered ``"module:attribute"`` string, not imported yet."""

    __slots__ = ("target",)

    def __init__(self, target: str):
        module, _, attribute = target.partition(":")
        if not module or not attribute or ":" in attribute:
            raise ValueError(f"lazy entry {target!r} is not of the form 'module:attribute'")
        self.target = target

    def load(self):
        module, attribute = self.target.split(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except AttributeError:
            raise ImportError(f"lazy entry {self.target!r}: module {module} has no attribute "
                              f"{attribute!r}") from None


def _qualified_name(entry) -> str | None:
    """``"module:qualname"`` of a class or function, the form a lazy entry names it by."""
    module, name = getattr(entry, "__module__", None), getattr(entry, "__qualname__", None)
    return f"{module}:{name}" if module and name else None


class Registry(Generic[T]):
    """Entries of one kind by name.

    ``kind`` names what the registry holds in error messages ("architecture", "style method").
    ``lazy``: initial ``{name: "module:attribute"}`` entries (see :meth:`register_lazy`).
    ``reserved``: ``{name: why}`` for names that callers give a meaning of their own (the style
    ``"none"``: no style step); they cannot be registered, are not entries, and are listed first
    among the known names when a lookup fails. ``plural``: the word before that list ("known
    sources: ..."), none by default ("known: ...").
    """

    def __init__(self, kind: str, *, lazy: Mapping[str, str] | None = None,
                 reserved: Mapping[str, str] | None = None, plural: str | None = None):
        self.kind = kind
        self.plural = plural
        self.reserved = dict(reserved or {})
        self._entries: dict[str, T | _Lazy] = {}
        for name, target in (lazy or {}).items():
            self.register_lazy(name, target)

    # -- adding --------------------------------------------------------------------------

    def _check_new(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names are non-empty strings, got {name!r}")
        if name in self.reserved:
            raise ValueError(f"{name!r} is reserved: {self.reserved[name]}")

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding the decorated class or function under ``name``; returns it unchanged.

        ValueError if ``name`` is reserved or already registered, unless the existing entry is a
        lazy string naming exactly the decorated object (its module being imported)."""
        self._check_new(name)

        def decorate(entry: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and not (isinstance(existing, _Lazy)
                                             and existing.target == _qualified_name(entry)):
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return decorate

    def register_lazy(self, name: str, target: str) -> None:
        """Add ``"module:attribute"`` under ``name``; the module is imported by the first
        :meth:`get` of ``name``. ValueError if ``name`` is reserved or already registered, or
        ``target`` is not of that form."""
        self._check_new(name)
        lazy = _Lazy(target)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = lazy

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's temporary entry); KeyError if it is not registered."""
        del self._entries[name]

    # -- looking up ----------------------------------------------------------------------

    def get(self, name: str) -> T:
        """The entry registered as ``name``, importing its module first if it is lazy.

        ValueError naming the kind, ``name`` and the known names if there is no such entry."""
        try:
            entry = self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(self.unknown_message(name)) from None
        if isinstance(entry, _Lazy):
            loaded = entry.load()
            # the module may have registered the object itself while being imported
            if self._entries.get(name) is entry:
                self._entries[name] = loaded
            entry = loaded
        return entry

    def unknown_message(self, name) -> str:
        """The error text of :meth:`get` for a name that is not registered."""
        known = ", ".join((*self.reserved, *self.names())) or "none"
        label = f"known {self.plural}" if self.plural else "known"
        return f"unknown {self.kind} {name!r}; {label}: {known}"

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted (reserved names are not entries). Imports nothing."""
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


__all__ = ["Registry"]
