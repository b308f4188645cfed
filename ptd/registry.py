"""A tiny name -> object registry shared by models, pruning strategies and distillation losses.

A failed lookup raises ``UnknownNameError`` listing every valid name, so a typo in a config
is answered with the fix rather than a KeyError.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from ptd.errors import PtdError

T = TypeVar("T")

# Every unknown-name message ends with how to add a name of one's own: a user whose config names
# their own model was told only the built-in names, with nothing saying the ptd command can load one.
OWN = " (or a name of your own: register it in a .py file and pass that file with --plugin FILE.py)"

# The plugin files this process imported (load_plugins), as {"path", "sha256"}: env.json records
# them and a re-run compares them, so a run is not resumed with another version of a plugin.
LOADED: list[dict[str, str]] = []


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
                f"unknown {self.kind} {name!r}{self.meant(name)}; valid names: {', '.join(sorted(self._items))}{OWN}"
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


def load_plugins(paths: "list[str]") -> list[dict[str, str]]:
    """Import each ``--plugin`` file (Python that registers models, strategies, losses or datasets
    by ptd's own decorators), in order, once. A file that is missing, not Python, or raises on import
    (a duplicate name included) is a one-line PtdError naming the file and the line it failed on;
    nothing is run after it. Returns (and keeps in LOADED) each file's absolute path and sha256."""
    import hashlib
    import importlib.util
    import os
    import sys
    import traceback

    for given in paths:
        if not given.strip():
            raise PluginError("--plugin: an empty path; give a .py file that registers your model, strategy or loss")
        path = os.path.abspath(given)
        if not os.path.isfile(path):
            raise PluginError(f"--plugin {given}: no such file; give the .py file that registers your model, strategy or loss")
        if not path.endswith(".py"):
            raise PluginError(f"--plugin {given}: not a .py file; give the Python file that registers your names")
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if any(p["sha256"] == digest for p in LOADED):
            continue  # the same file named twice: importing it again would register every name twice
        # A name of its own per file (the digest's head), so two plugins called plugin.py do not clash.
        modname = f"ptd_plugin_{''.join(c if c.isalnum() else '_' for c in os.path.basename(path)[:-3])}_{digest[:8]}"
        spec = importlib.util.spec_from_file_location(modname, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module  # dataclasses and pickling look modules up by name
        # Its own folder first on the import path, as `python mine.py` would put it: a plugin that
        # imports a helper module beside it (from mylayers import Block) then finds it.
        if os.path.dirname(path) not in sys.path:
            sys.path.insert(0, os.path.dirname(path))
        try:
            spec.loader.exec_module(module)
        except BaseException as e:
            sys.modules.pop(modname, None)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            frames = [fr for fr in traceback.extract_tb(e.__traceback__) if os.path.abspath(fr.filename) == path]
            line = f" (line {frames[-1].lineno})" if frames else (f" (line {e.lineno})" if getattr(e, "lineno", None) else "")
            msg = " ".join(str(e).split()) or type(e).__name__
            raise PluginError(f"--plugin {given}: importing it raised {type(e).__name__}{line}: {msg[:300]}; fix the plugin "
                              f"(nothing was run)") from None
        LOADED.append({"path": path, "sha256": digest})
    return list(LOADED)


class PluginError(PtdError):
    """A --plugin file that cannot be loaded."""
