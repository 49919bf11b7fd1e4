"""Isolated import and unload of one package version.

Every version gets a private top-level module, its *namespace* (`_hotdeploy_orders_2_0_0_n3`),
whose `__path__` is the version's directory: `orders.models` of that version is imported as
`<namespace>.orders.models`. The package's own absolute imports (`import orders`, also run lazily
inside a function) must land in the same version, so every module of the version executes with
its own `__builtins__`, whose `__import__` rewrites the package's top-level names to the
namespace. Third-party imports are untouched and shared.
"""

from __future__ import annotations

import builtins
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import itertools
import logging
import re
import sys
import types
import typing
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._errors import LoadError
from ._manifest import Manifest
from ._types import ASGIApp

_PREFIX = "_hotdeploy_"
_counter = itertools.count(1)
_namespaces: dict[str, Namespace] = {}


class Namespace:
    """The private module namespace of one loaded version."""

    def __init__(self, manifest: Manifest, root: Path) -> None:
        safe_version = re.sub(r"\W", "_", manifest.version)
        self.name = f"{_PREFIX}{manifest.name}_{safe_version}_n{next(_counter)}"
        self.root = root
        self.package = manifest.name
        self.version = manifest.version
        self.top_level = _top_level_names(root)
        self.builtins = dict(builtins.__dict__)
        self.builtins["__import__"] = self._import
        self._loaded = False

    def __repr__(self) -> str:
        return f"<Namespace {self.name} root={self.root}>"

    def _import(
        self,
        name: str,
        globals: Mapping[str, object] | None = None,
        locals: Mapping[str, object] | None = None,
        fromlist: Sequence[str] = (),
        level: int = 0,
    ) -> types.ModuleType:
        if level == 0 and name.partition(".")[0] in self.top_level:
            aliased = f"{self.name}.{name}"
            module = builtins.__import__(aliased, globals, locals, fromlist, 0)
            if fromlist:
                return module
            # `import orders.models` binds `orders`: the version's top-level package.
            return sys.modules[f"{self.name}.{name.partition('.')[0]}"]
        return builtins.__import__(name, globals, locals, fromlist, level)

    def open(self) -> None:
        """Make the namespace importable."""
        _install_finder()
        module = types.ModuleType(
            self.name, f"starlette-hotdeploy namespace of {self.package} {self.version}"
        )
        module.__path__ = [str(self.root)]
        module.__spec__ = importlib.machinery.ModuleSpec(self.name, None, is_package=True)
        module.__spec__.submodule_search_locations = [str(self.root)]
        _namespaces[self.name] = self
        sys.modules[self.name] = module
        self._loaded = True

    def import_module(self, dotted: str) -> types.ModuleType:
        """Import `dotted` (e.g. 'orders.app') as this version's module."""
        if dotted.partition(".")[0] not in self.top_level:
            return importlib.import_module(dotted)
        return importlib.import_module(f"{self.name}.{dotted}")

    def close(self) -> None:
        """Remove every module of this version from the interpreter's caches."""
        _namespaces.pop(self.name, None)
        prefix = self.name + "."
        for key in [k for k in sys.modules if k == self.name or k.startswith(prefix)]:
            del sys.modules[key]
        root = str(self.root)
        for key in [k for k in sys.path_importer_cache if k.startswith(root)]:
            del sys.path_importer_cache[key]
        manager = logging.Logger.manager
        for key in [k for k in manager.loggerDict if k == self.name or k.startswith(prefix)]:
            del manager.loggerDict[key]
        # typing caches generic aliases (list[Order]) with strong references to the classes.
        for clear in getattr(typing, "_cleanups", ()):
            clear()
        self.builtins.clear()
        self._loaded = False


class _VersionLoader(importlib.machinery.SourceFileLoader):
    """Executes a version's module with the namespace's `__builtins__`."""

    def __init__(self, fullname: str, path: str, namespace: Namespace) -> None:
        super().__init__(fullname, path)
        self.namespace = namespace

    def exec_module(self, module: types.ModuleType) -> None:
        module.__builtins__ = self.namespace.builtins  # type: ignore[attr-defined]
        super().exec_module(module)


class _NamespaceFinder(importlib.abc.MetaPathFinder):
    """Finds modules under a namespace with the normal path machinery, then swaps the loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_PREFIX):
            return None
        namespace = _namespaces.get(fullname.partition(".")[0])
        if namespace is None or path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        assert spec.origin is not None
        loader = _VersionLoader(fullname, spec.origin, namespace)
        return importlib.util.spec_from_file_location(
            fullname,
            spec.origin,
            loader=loader,
            submodule_search_locations=spec.submodule_search_locations,
        )


_finder = _NamespaceFinder()


def _install_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def _top_level_names(root: Path) -> frozenset[str]:
    names = set()
    for child in root.iterdir():
        if child.is_dir() and child.name.isidentifier() and (child / "__init__.py").is_file():
            names.add(child.name)
        elif child.is_dir() and child.name.isidentifier() and any(child.glob("*.py")):
            names.add(child.name)  # a namespace package
        elif child.suffix == ".py" and child.stem.isidentifier():
            names.add(child.stem)
    return frozenset(names)


def _where(exc: BaseException, inside: Path | None = None) -> str:
    """' (file.py:12)': the innermost frame in the package's directory `inside`, else the
    innermost frame, for error messages."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({Path(exc.filename).name}:{exc.lineno})"
    root = str(inside) if inside is not None else None
    innermost = in_package = ""
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        innermost = f" ({Path(filename).name}:{tb.tb_lineno})"
        if root is not None and filename.startswith(root):
            in_package = innermost
        tb = tb.tb_next
    return in_package or innermost


def load_app(namespace: Namespace, manifest: Manifest) -> ASGIApp:
    """Import the manifest's `app` from the namespace and check that it is an ASGI app."""
    context = {"package": manifest.name, "version": manifest.version, "step": "load"}
    try:
        module = namespace.import_module(manifest.app_module)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").removeprefix(namespace.name + ".")
        where = _where(exc, inside=namespace.root)
        raise LoadError(
            f"cannot import {manifest.app_module!r}{where}: no module named {missing!r}", **context
        ) from exc
    except SyntaxError as exc:
        raise LoadError(
            f"syntax error in {manifest.app_module!r}{_where(exc)}: {exc.msg}", **context
        ) from exc
    except Exception as exc:
        raise LoadError(
            f"importing {manifest.app_module!r} raised {type(exc).__name__}{_where(exc, namespace.root)}: {exc}",
            **context,
        ) from exc

    target: Any = module
    for part in manifest.app_attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise LoadError(
                f"module {manifest.app_module!r} has no attribute {manifest.app_attribute!r}", **context
            ) from None
    if manifest.app_is_factory:
        if not callable(target):
            raise LoadError(f"{manifest.app!r}: {manifest.app_attribute} is not callable", **context)
        try:
            target = target()
        except Exception as exc:
            raise LoadError(
                f"factory {manifest.app!r} raised {type(exc).__name__}{_where(exc, namespace.root)}: {exc}",
                **context,
            ) from exc
    _check_asgi(target, manifest)
    return typing.cast(ASGIApp, target)


def _check_asgi(app: object, manifest: Manifest) -> None:
    context = {"package": manifest.name, "version": manifest.version, "step": "load"}
    if isinstance(app, type) or not callable(app):
        raise LoadError(
            f"{manifest.app!r} is {type(app).__name__}, not an ASGI application "
            "(an async callable taking scope, receive, send)",
            **context,
        )
    try:
        signature = inspect.signature(app)
    except (TypeError, ValueError):
        return  # builtins and C callables: nothing to check
    try:
        signature.bind(object(), object(), object())
    except TypeError:
        raise LoadError(
            f"{manifest.app!r} does not take (scope, receive, send): signature {signature}; "
            "is it an ASGI application?",
            **context,
        ) from None


def collected(refs: Sequence[weakref.ref[Any]], *, collect: bool = True) -> bool:
    """True when every referent is gone (after a full collection if `collect`)."""
    if collect:
        gc.collect()
    return all(ref() is None for ref in refs)


def weak_refs(*objects: object) -> list[weakref.ref[Any]]:
    refs: list[weakref.ref[Any]] = []
    for obj in objects:
        try:
            refs.append(weakref.ref(obj))
        except TypeError:
            continue
    return refs


Factory = Callable[[], ASGIApp]
