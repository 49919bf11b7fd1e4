"""Isolated import and unload of one package version, and the boundary around package code.

Namespaces. Every version gets a private top-level module, its *namespace*
(`_hotdeploy_orders_2_0_0_n3`), whose `__path__` is the version's directory: `orders.models` of
that version is imported as `<namespace>.orders.models`. The package's own absolute imports
(`import orders`, also run lazily inside a function) must land in the same version, so every
module of the version executes with its own `__builtins__`, whose `__import__` rewrites the
package's top-level names to the namespace. The top-level names of the versions it is bound to
(the packages it requires) are rewritten to their namespaces the same way, after a check of their
`exports`. Third-party imports are untouched and shared.

The boundary. Package code must not take the server down. Wherever the deployer runs it (the
import and factory here, the lifespan, the hooks, the health probe), any BaseException it raises
(SystemExit, KeyboardInterrupt, GeneratorExit, an exception group...) becomes a failure of that
deployment whose message names it (`describe`). Only anyio's cancellation goes through
(`is_cancellation`): that one is the deployer's own, not the package's.

Off the event loop, bounded. The engine runs `load_app` (and the package's hooks module) in a
worker thread under the manifest's `load_timeout`, so a slow import stalls nothing else. Python
cannot kill a thread: at the timeout the deployment fails and the thread is *abandoned*:

- it runs on until its import returns, and keeps what it holds (memory, sockets, file handles,
  its frames and the half-imported modules); a busy loop keeps taking its share of the GIL;
- its namespace is closed at once: its modules leave `sys.modules`, its `__builtins__` is
  emptied (the next builtin it looks up or import it makes fails), new imports under the
  namespace no longer resolve, and whatever it installed is removed again when it returns
  (`audited`); its result is thrown away, so it can never become a version's app;
- the import lock of the module it is executing stays held. For the version's own modules that
  is harmless (nothing else imports them); a thread stuck inside a *third-party* module's first
  import blocks every other import of that module in the process;
- anyio's asyncio worker threads are not daemon threads: at exit the interpreter waits for the
  thread, so a server stopped while an import is stuck exits when it returns (or is killed).

What a load may not touch. `audited` records `sys.modules` (names and objects) and the real
`builtins.__dict__` before a load and compares them after it, whether it succeeded or not: an
entry of `sys.modules` outside the version's own namespace that was removed or replaced, or a
builtin that was added, removed or replaced, is put back and the load refused. New third-party
imports are allowed and kept. Other versions load and unload at the same time in other threads,
so entries of a namespace that is no longer open are ignored (it was unloaded), and so are
modules that were still being imported when the snapshot was taken (a failing import removes
its module). Another *open* version's module being replaced is what this is for, and is caught.
When loads overlap, who did it cannot be told apart: every load that overlapped the change is
refused, and says so.

It is a tripwire, not a sandbox: package code runs in the server's process with its rights. It
can still patch attributes of shared modules (`json.dumps = evil`, a class's methods), change
`sys.path`, `sys.meta_path`, logging or the environment, start threads, or do any of it later
(in a request or its lifespan) when no load is being watched. None of that is detected or
undone. Deploy only code you trust.
"""

from __future__ import annotations

import builtins
import functools
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import itertools
import linecache
import logging
import marshal
import os
import re
import sys
import threading
import time
import types
import typing
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio

from ._errors import LoadError
from ._manifest import Manifest
from ._package_logging import PackageLogging
from ._types import ASGIApp

logger = logging.getLogger("starlette_hotdeploy")

_PREFIX = "_hotdeploy_"
_counter = itertools.count(1)
_namespaces: dict[str, Namespace] = {}
T = TypeVar("T")


class Namespace:
    """The private module namespace of one loaded version."""

    def __init__(
        self,
        manifest: Manifest,
        root: Path,
        bound: Sequence[Namespace] = (),
        top_level: frozenset[str] | None = None,
    ) -> None:
        safe_version = re.sub(r"\W", "_", manifest.version)
        self.name = f"{_PREFIX}{manifest.name}_{safe_version}_n{next(_counter)}"
        self.root = root
        self.manifest = manifest
        self.package = manifest.name
        self.version = manifest.version
        self.top_level = top_level_names(root) if top_level is None else top_level
        # The namespaces of the required versions this one is bound to, by their top-level
        # module names: `import inventory.api` resolves to the bound version of inventory.
        self.bound: dict[str, Namespace] = {
            top: other for other in bound for top in other.top_level if top not in self.top_level
        }
        self.builtins = dict(builtins.__dict__)
        self.builtins["__import__"] = self._import
        self.logging = PackageLogging(self.name, self.package, self.version, self.top_level)
        # Every module name looked up under the namespace (by `_NamespaceFinder`): what unload
        # goes through, rather than all of `sys.modules` once per version (quadratic when a
        # server with 1000 packages stops).
        self._names: set[str] = {self.name}
        self._loaded = False

    def __repr__(self) -> str:
        return f"<Namespace {self.name} root={self.root}>"

    @property
    def is_open(self) -> bool:
        return self._loaded

    def _import(
        self,
        name: str,
        globals: Mapping[str, object] | None = None,
        locals: Mapping[str, object] | None = None,
        fromlist: Sequence[str] = (),
        level: int = 0,
    ) -> types.ModuleType:
        if level == 0:
            top = name.partition(".")[0]
            if top in self.top_level:
                return _aliased_import(self, name, globals, locals, fromlist)
            other = self.bound.get(top)
            if other is not None:
                self._check_exported(other, name, fromlist)
                return _aliased_import(other, name, globals, locals, fromlist)
        try:
            module = builtins.__import__(name, globals, locals, fromlist, level)
        except ModuleNotFoundError as exc:
            if level == 0:
                self._refuse_unbound(name, exc)
            raise
        if level == 0 and (name == "logging" or (name.startswith("logging.") and not fromlist)):
            return self.logging  # `import logging`: the package's own logger names
        return module

    def _check_exported(self, other: Namespace, name: str, fromlist: Sequence[str]) -> None:
        """A dependent imports only what its requirement exports (`exports` in its manifest)."""
        exported = other.manifest.exported
        if not fromlist and "." in name and exported(name) and not exported(name.partition(".")[0]):
            # `import inventory.api` binds `inventory`, and with it every module of inventory
            # imported so far: only `from ... import` gives exactly what is exported.
            parent, _, child = name.rpartition(".")
            raise ImportError(
                f"{self.package} {self.version}: write `from {parent} import {child}` (or `from {name} "
                f"import ...`): `import {name}` would give it all of {other.package}, which exports only "
                f"{', '.join(other.manifest.exports or ())}",
                name=name,
            )
        if exported(name) or (fromlist and all(exported(f"{name}.{item}") for item in fromlist)):
            return
        wanted = f"{', '.join(fromlist)} from {name!r}" if fromlist else repr(name)
        raise ImportError(
            f"{self.package} {self.version} imports {wanted}, which {other.package} {other.version} "
            f"does not export (its exports: {', '.join(other.manifest.exports or ())})",
            name=name,
        )

    def _refuse_unbound(self, name: str, exc: ModuleNotFoundError) -> None:
        """`name` was not found: if another package's version provides it, say why it is not
        this version's to import (a clearer error than 'no module named')."""
        top = name.partition(".")[0]
        if exc.name is None or exc.name.partition(".")[0] != top:
            return
        owner = next(
            (ns for ns in list(_namespaces.values()) if top in ns.top_level and ns.package != self.package),
            None,
        )
        if owner is None:
            return
        if owner.package not in self.manifest.requires:
            why = f"it does not require {owner.package}: add {owner.package} to its `requires`"
        elif not self.manifest.reload_with_requirements:
            why = (
                "its manifest says reload_with_requirements = false (it talks to "
                f"{owner.package} over HTTP only); remove that key to import {owner.package}'s modules"
            )
        else:
            why = f"no version of {owner.package} was active when it loaded, so it is bound to none"
        raise ImportError(
            f"{self.package} {self.version} cannot import {name!r} of package {owner.package}: {why}",
            name=name,
        ) from None

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

    def owns(self, module_name: str) -> bool:
        return module_name == self.name or module_name.startswith(self.name + ".")

    def noted(self, module_name: str) -> None:
        """`module_name` (under this namespace) is being imported."""
        self._names.add(module_name)

    def modules(self) -> list[tuple[str, types.ModuleType]]:
        """This version's modules in `sys.modules` now."""
        # list() copies in one step: imports in other threads change the set meanwhile.
        found = ((name, sys.modules.get(name)) for name in list(self._names))
        return [(name, module) for name, module in found if module is not None]

    def definitions(self) -> list[object]:
        """The classes and functions defined in this version's modules. A module can be freed
        while its globals live on (a cached class's methods hold them): weak references to these
        show what the modules' own do not."""
        found: list[object] = []
        for _, module in self.modules():
            for value in list(getattr(module, "__dict__", {}).values()):
                if not isinstance(value, type | types.FunctionType):
                    continue
                try:
                    defined_here = self.owns(str(value.__module__))
                except Exception:  # package code: a class's `__module__` can be anything
                    continue
                if defined_here:
                    found.append(value)
        return found

    def close(self) -> None:
        """Remove every module of this version from the interpreter's caches. Idempotent: an
        abandoned import thread calls it again when it returns, for what it installed since."""
        _namespaces.pop(self.name, None)
        modules = self.modules()
        # The directories the path finder cached a finder for: the root and each package's.
        directories = {str(self.root)}
        for key, module in modules:
            sys.modules.pop(key, None)
            directories.update(str(path) for path in getattr(module, "__path__", None) or ())
        for directory in directories:
            sys.path_importer_cache.pop(directory, None)
        root = str(self.root)
        # The lines of every source file `inspect.getsource` read (FastAPI does, per endpoint).
        for key in [k for k in list(linecache.cache) if k.startswith(root)]:
            linecache.cache.pop(key, None)
        manager = logging.Logger.manager
        for key in [k for k in list(manager.loggerDict) if self.owns(k)]:
            manager.loggerDict.pop(key, None)
        # typing caches generic aliases (list[Order]) with strong references to the classes.
        for clear in getattr(typing, "_cleanups", ()):
            clear()
        # `@typing.overload` (3.11+) registers every overloaded function by module name, forever.
        overloads = getattr(typing, "_overload_registry", None)
        if overloads is not None:
            for key in [k for k in list(overloads) if self.owns(k)]:
                overloads.pop(key, None)
        self.builtins.clear()
        self.logging.close()
        self._loaded = False


def _aliased_import(
    namespace: Namespace,
    name: str,
    globals: Mapping[str, object] | None,
    locals: Mapping[str, object] | None,
    fromlist: Sequence[str],
) -> types.ModuleType:
    """`name` (absolute, under one of `namespace`'s top-level names) as that version's module."""
    module = builtins.__import__(f"{namespace.name}.{name}", globals, locals, fromlist, 0)
    if fromlist:
        return module
    # `import orders.models` binds `orders`: the version's top-level package.
    return sys.modules[f"{namespace.name}.{name.partition('.')[0]}"]


class _VersionLoader(importlib.machinery.SourceFileLoader):
    """Executes a version's module with the namespace's `__builtins__`."""

    def __init__(self, fullname: str, path: str, namespace: Namespace) -> None:
        super().__init__(fullname, path)
        self.namespace = namespace

    def exec_module(self, module: types.ModuleType) -> None:
        module.__builtins__ = self.namespace.builtins  # type: ignore[attr-defined]
        super().exec_module(module)

    # An instance method of SourceLoader at run time (typeshed has InspectLoader's static one).
    def source_to_code(self, data: Any, path: Any, *, _optimize: int = -1) -> types.CodeType:  # type: ignore[override]
        code: types.CodeType = super().source_to_code(data, path, _optimize=_optimize)
        if sys.dont_write_bytecode:
            # PYTHONDONTWRITEBYTECODE (common in container images) is about the code the image
            # ships; a version's directory is the deployer's own copy, imported again by every
            # restart and every worker: its bytecode is cached all the same.
            _cache_bytecode(self, code, str(path))
        return code


def _cache_bytecode(loader: importlib.machinery.SourceFileLoader, code: types.CodeType, source: str) -> None:
    """Write what importlib would have written: a timestamp-based .pyc (PEP 552) of `source`.
    A failed write is ignored, as importlib ignores it (`set_data` skips unwritable places)."""
    try:
        stat = os.stat(source)
    except OSError:
        return
    data = bytearray(importlib.util.MAGIC_NUMBER)
    data += (0).to_bytes(4, "little")  # flags: validated by the source's mtime and size
    data += (int(stat.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
    data += (stat.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    data += marshal.dumps(code)
    loader.set_data(importlib.util.cache_from_source(source), bytes(data))


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
        namespace.noted(fullname)
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


def top_level_names(root: Path) -> frozenset[str]:
    """The names a version's code imports itself by: its packages and modules at `root`."""
    names = set()
    for child in root.iterdir():
        if child.is_dir() and child.name.isidentifier() and (child / "__init__.py").is_file():
            names.add(child.name)
        elif child.is_dir() and child.name.isidentifier() and any(child.glob("*.py")):
            names.add(child.name)  # a namespace package
        elif child.suffix == ".py" and child.stem.isidentifier():
            names.add(child.stem)
    return frozenset(names)


# -- the boundary: naming what package code raised ------------------------------------------------


def is_cancellation(exc: BaseException) -> bool:
    """The running backend's cancellation (or a group of nothing else): the deployer's own, to
    propagate untouched. Call it from async code only (it asks the running backend)."""
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(exc, cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(cancelled)[1] is None
    return False


def describe(exc: BaseException) -> str:
    """'RuntimeError: boom', 'SystemExit(3)', 'KeyboardInterrupt': for messages. Never raises,
    though the exception's `__str__` and `__repr__` are package code too."""
    name = type(exc).__name__
    try:
        if isinstance(exc, BaseExceptionGroup):
            inner = ", ".join(describe(e) for e in exc.exceptions[:3])
            more = ", ..." if len(exc.exceptions) > 3 else ""
            return f"{name}({inner}{more})"
        if isinstance(exc, Exception):
            text = _text(exc)
            return f"{name}: {text}" if text else name
        args = ", ".join(_clip(repr(arg)) for arg in exc.args)
        return f"{name}({args})" if exc.args else name
    except BaseException:  # an evil __repr__: the name will do
        return name


def what_raised(exc: BaseException, inside: Path | None = None) -> str:
    """What follows 'raised' in a load error: 'RuntimeError (app.py:2): no database' for an
    Exception (its message last), 'SystemExit(3) (app.py:4)' for the others."""
    where = _where(exc, inside)
    if isinstance(exc, Exception) and not isinstance(exc, BaseExceptionGroup):
        text = _text(exc)
        return f"{type(exc).__name__}{where}: {text}" if text else f"{type(exc).__name__}{where}"
    return f"{describe(exc)}{where}"


def _text(exc: BaseException) -> str:
    try:
        return _clip(str(exc))
    except BaseException:  # an evil __str__
        return ""


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# -- importing the app (blocking: the engine runs this in a worker thread) ----------------------------


def load_app(namespace: Namespace, manifest: Manifest) -> ASGIApp:
    """Import the manifest's `app` from the namespace and check that it is an ASGI app.

    Whatever the package raises comes out as a LoadError (it runs in a worker thread: there is
    no cancellation to let through)."""
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
    except BaseException as exc:
        raise LoadError(
            f"importing {manifest.app_module!r} raised {what_raised(exc, namespace.root)}", **context
        ) from exc
    try:
        target = _resolve(module, manifest)
        if manifest.app_is_factory:
            target = _call_factory(target, namespace, manifest)
        _check_asgi(target, manifest)
    except LoadError:
        raise
    except BaseException as exc:  # a module __getattr__, a __signature__ property...
        raise LoadError(
            f"resolving {manifest.app!r} raised {what_raised(exc, namespace.root)}", **context
        ) from exc
    return typing.cast(ASGIApp, target)


def _resolve(module: types.ModuleType, manifest: Manifest) -> Any:
    target: Any = module
    for part in manifest.app_attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise LoadError(
                f"module {manifest.app_module!r} has no attribute {manifest.app_attribute!r}",
                package=manifest.name,
                version=manifest.version,
                step="load",
            ) from None
    return target


def _call_factory(factory: Any, namespace: Namespace, manifest: Manifest) -> Any:
    context = {"package": manifest.name, "version": manifest.version, "step": "load"}
    if not callable(factory):
        raise LoadError(f"{manifest.app!r}: {manifest.app_attribute} is not callable", **context)
    try:
        return factory()
    except BaseException as exc:
        raise LoadError(
            f"factory {manifest.app!r} raised {what_raised(exc, namespace.root)}", **context
        ) from exc


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
    why = _not_async(app)
    if why is not None:
        # It would pass every check and answer 500 to every request.
        raise LoadError(
            f"{manifest.app!r} is {why}; an ASGI app is `async def app(scope, receive, send)`", **context
        )


def _not_async(app: object) -> str | None:
    """What makes `app` not an async callable, or None. Functions, partials and objects whose
    `__call__` is written in Python are checked; C callables cannot be told, and pass."""
    partial = ""
    while isinstance(app, functools.partial):
        app, partial = app.func, "a partial of "
    if inspect.isfunction(app) or inspect.ismethod(app):
        if inspect.iscoroutinefunction(app):
            return None
        if inspect.isasyncgenfunction(app):
            return f"{partial}an async generator function"
        return f"{partial}a plain (sync) function"
    call = inspect.getattr_static(type(app), "__call__", None)  # static: runs no descriptor
    if inspect.isfunction(call) and not inspect.iscoroutinefunction(call):
        return f"{partial}an instance of {type(app).__name__} whose __call__ is a plain (sync) function"
    return None


# -- what a load may not touch ------------------------------------------------------------------------

_MISSING = object()
_IGNORED_BUILTINS = frozenset({"_"})  # the interactive interpreter's last result


@dataclass(eq=False)
class _Audit:
    """One load under way; what its audit put back when it ended (see _Audits)."""

    started: int
    ended: int | None = None
    undone: str = ""
    heard: list[str] = field(default_factory=list)  # what overlapping loads put back
    overlapped: bool = False  # another load still ran when this one ended


@dataclass
class _Audits:
    """Loads under way and what their audits put back. Loads that overlap share the blame: a
    change one of them made may be found (and put back) by the audit of another."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    clock: itertools.count[int] = field(default_factory=itertools.count)
    running: set[_Audit] = field(default_factory=set)
    undid: list[_Audit] = field(default_factory=list)  # ended, and put something back

    def begin(self) -> _Audit:
        with self.lock:
            audit = _Audit(next(self.clock))
            self.running.add(audit)
            return audit

    def end(self, audit: _Audit, undo: Callable[[], str]) -> None:
        """Run `undo` (atomically with the other audits'); note what overlapping loads undid."""
        with self.lock:
            audit.undone = undo()
            audit.ended = next(self.clock)
            self.running.discard(audit)
            audit.overlapped = bool(self.running)
            audit.heard = [o.undone for o in self.undid if o.ended is not None and o.ended > audit.started]
            if audit.undone:
                self.undid.append(audit)
            # Keep only what a load still running may have to hear about.
            oldest = min((a.started for a in self.running), default=audit.ended)
            self.undid = [a for a in self.undid if a.ended is not None and a.ended > oldest]


_audits = _Audits()


@dataclass(frozen=True)
class _Snapshot:
    modules: dict[str, types.ModuleType]  # (or whatever else was put there)
    builtins: dict[str, object]

    @classmethod
    def take(cls) -> _Snapshot:
        # Modules still being imported (in any thread) are left out: if that import fails, the
        # module goes away, and that is no tampering. Read before and after the copy, which is
        # one step for the GIL (other threads import meanwhile). A snapshot is taken per load:
        # it must stay a C-speed copy, not a Python loop over every module (a restore of 1000
        # packages loads 1000 times over several thousand entries).
        in_flight = _imports_in_flight()
        modules = sys.modules.copy()
        for name in in_flight | _imports_in_flight():
            modules.pop(name, None)
        return cls(modules, builtins.__dict__.copy())

    def undo(self, namespace: Namespace, now: dict[str, object]) -> str:
        """Put back what was removed or replaced since (`now`: a copy of sys.modules); say
        what ('' if nothing)."""
        changes: dict[str, list[str]] = {"replaced": [], "removed": [], "added": []}
        if not _still_holds(now, self.modules):
            for name, module in self.modules.items():
                current: object = now.get(name, _MISSING)
                if current is module or not _watched(name, namespace):
                    continue
                changes["removed" if current is _MISSING else "replaced"].append(f"sys.modules[{name!r}]")
                sys.modules[name] = module
        real = builtins.__dict__
        current_builtins = real.copy()
        if not _still_holds(current_builtins, self.builtins) or len(current_builtins) != len(self.builtins):
            for name, value in self.builtins.items():
                current = current_builtins.get(name, _MISSING)
                if current is value or name in _IGNORED_BUILTINS:
                    continue
                changes["removed" if current is _MISSING else "replaced"].append(f"builtins.{name}")
                real[name] = value
            for name in current_builtins.keys() - self.builtins.keys() - _IGNORED_BUILTINS:
                changes["added"].append(f"builtins.{name}")
                real.pop(name, None)
        return ", ".join(f"{verb} {_and(sorted(names))}" for verb, names in changes.items() if names)


def _still_holds(now: Mapping[str, object], before: Mapping[str, object]) -> bool:
    """Whether every entry of `before` is in `now`, unchanged: a C-speed check (identity first)
    that lets the usual load, which only adds modules, skip the entry-by-entry comparison. An
    object whose `__eq__` lies, or raises, could pass for the one it replaced: this is a
    tripwire for mistakes, not a guard against code that hides from it."""
    try:
        return now.items() >= before.items()
    except BaseException:  # a worker thread; package objects' __eq__ may raise anything
        return False


# The import system's module locks (name -> weak reference to the lock): an entry for each
# import in flight, in any thread. Private to importlib, in every CPython 3 since 3.3.
_module_locks: dict[str, object] | None = getattr(
    getattr(importlib, "_bootstrap", None), "_module_locks", None
)


def _imports_in_flight() -> set[str]:
    if _module_locks is None:  # another interpreter: look at every module's spec instead
        return {name for name, module in sys.modules.copy().items() if _initializing(module)}
    return set(_module_locks.copy())


def _initializing(module: object) -> bool:
    """Still being imported, in some thread: if that import fails, the module goes away."""
    try:
        if not issubclass(type(module), types.ModuleType):  # type(): no __class__ property runs
            return False
        spec = module.__dict__.get("__spec__")
        return bool(getattr(spec, "_initializing", False))
    except BaseException:  # anything may sit in sys.modules (a worker thread: nothing to let through)
        return False


def _watched(module_name: str, namespace: Namespace) -> bool:
    """Whether the load of `namespace` may not remove or replace this entry of sys.modules: any
    but its own, and those of namespaces closed meanwhile (they were unloaded)."""
    if not module_name.startswith(_PREFIX):
        return True
    return not namespace.owns(module_name) and module_name.partition(".")[0] in _namespaces


def _and(items: Sequence[str], limit: int = 4) -> str:
    shown = list(items[:limit])
    if len(items) > limit:
        shown.append(f"{len(items) - limit} more")
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def audited(namespace: Namespace, load: Callable[[], T]) -> T:
    """Run `load` (blocking; in a worker thread) and refuse it, with a LoadError, if it touched
    `sys.modules` or the builtins (see the module docstring); whatever it touched is put back.

    If the namespace was closed meanwhile (the load overran its timeout and was abandoned),
    what the import installed under it since is removed, and the late outcome only logged."""
    began = time.monotonic()
    audit = _audits.begin()
    before = _Snapshot.take()
    result: Any = _MISSING
    error: BaseException | None = None
    try:
        result = load()
    except BaseException as exc:  # a worker thread: nothing here is ours to let through
        error = exc
    after: list[dict[str, Any]] = []

    def undo() -> str:  # atomically with the other loads' audits (see _Audits.end)
        after.append(sys.modules.copy())
        return before.undo(namespace, after[0])

    _audits.end(audit, undo)
    # Entries the load put under its namespace by hand (not through the finder) go at unload too.
    for name in after[0].keys() - before.modules.keys():
        if namespace.owns(name):
            namespace.noted(name)
    context = {"package": namespace.package, "version": namespace.version, "step": "load"}
    if not namespace.is_open:
        namespace.close()  # again: its modules and loggers from after the first close
        logger.warning(
            "%s %s: the abandoned import returned after %.1fs (%s); its modules were removed%s",
            namespace.package,
            namespace.version,
            time.monotonic() - began,
            "failed" if error is not None else "too late",
            f"; it {audit.undone}, undone" if audit.undone else "",
        )
    if audit.undone:
        shared = "; loads overlapped, so another may have done it" if audit.overlapped or audit.heard else ""
        raise LoadError(f"the import {audit.undone}; undone{shared}", **context) from error
    if audit.heard:
        raise LoadError(
            f"while this version loaded, another load's import {audit.heard[0]} (undone); "
            "loads overlapped, so either may have done it",
            **context,
        ) from error
    if error is not None:
        if isinstance(error, LoadError):
            raise error
        raise LoadError(f"loading raised {what_raised(error, namespace.root)}", **context) from error
    return typing.cast(T, result)


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
