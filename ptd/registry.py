"""A tiny name -> object registry shared by models, pruning strategies and distillation losses.

A failed lookup raises ``UnknownNameError`` listing every valid name, so a typo in a config
is answered with the fix rather than a KeyError.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from ptd.errors import PtdError

T = TypeVar("T")


class UnknownNameError(PtdError, KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


def _squash(name: str) -> str:
    """A name's letters and digits, lower case: cifar-10 and CIFAR10 are cifar10."""
    return "".join(c for c in name.lower() if c.isalnum())


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{self.meant(name)}; valid names: {', '.join(sorted(self._items))}"
            ) from None

    def meant(self, name: object) -> str:
        """' (did you mean 'x'?)' for the name a typo most likely meant (``nearest``); for the stem of
        a family, ' (did you mean one of 'x1', 'x2'?)': 'resnet' got "did you mean 'resnet56'?", one
        of the eleven resnets picked by spelling alone (new-user audit); else ''."""
        near = self.nearest(name)
        if isinstance(name, str) and name and not (near and _squash(near) == _squash(name)):  # 'VGG' means vgg itself
            family = sorted((n for n in self._items if n.lower().startswith(name.lower()) and n.lower() != name.lower()),
                            key=lambda n: (len(n), n))
            if len(family) > 1:
                return f" (did you mean one of {', '.join(map(repr, family))}?)"
        return f" (did you mean {near!r}?)" if near else ""

    def nearest(self, name: object) -> str | None:
        """The registered name a typo most likely meant: the same letters and digits ignoring case,
        '-' and '_' (cifar-10 for cifar10), else difflib's closest at 0.75 similarity, else None."""
        import difflib

        if not isinstance(name, str):
            return None
        same = [n for n in self._items if _squash(n) == _squash(name)]
        if same:
            return same[0]
        close = difflib.get_close_matches(name.lower(), list(self._items), n=1, cutoff=0.75)
        return close[0] if close else None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
