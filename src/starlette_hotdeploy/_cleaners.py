"""Releasing an unloaded version: unload cleaners, then one scheduled collection.

Closing a namespace (`Namespace.close`) removes the version's modules from the interpreter's
own caches; libraries keep registries of their own, keyed on the version's functions and
classes, that hold the whole version (its modules, its app, every object it made) for the life
of the process. An *unload cleaner* releases one library's entries for one version: it is
called with an `Unloaded`, right after the unload, and must not fail the unload (an error is
logged with the cleaner's name). The built-in cleaners below cover FastAPI and pydantic, each
only if the library is already imported (nothing is imported to be cleaned); plugins add their
own with the `hotdeploy_unloaded` hook, called after them.

What is left is cyclic garbage (a module's functions point at its globals, which point at
them). `Collector` frees it with one full collection when no version is being prepared,
instead of leaving it to the automatic collector, whose full collections come at any
allocation (in the middle of the next deployment's import) and scan all of it.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio

logger = logging.getLogger("starlette_hotdeploy")


@dataclass(frozen=True)
class Unloaded:
    """A version that was just unloaded, as unload cleaners (`hotdeploy_unloaded`) see it.

    `namespace` is the module-name prefix of its modules: `orders.models` of that version was
    imported as `<namespace>.orders.models`; `root` is the directory it was imported from."""

    package: str
    version: str
    namespace: str
    root: Path

    def owns(self, module_name: str) -> bool:
        """Whether `module_name` was one of the version's modules."""
        return module_name == self.namespace or module_name.startswith(self.namespace + ".")

    def defined(self, obj: object) -> bool:
        """Whether `obj` (a class or a function) was defined in one of the version's modules."""
        try:
            module = getattr(obj, "__module__", None)
        except Exception:  # a hostile __getattr__ on a metaclass
            return False
        return isinstance(module, str) and self.owns(module)

    def mentioned(self, key: object, depth: int = 4) -> bool:
        """Whether `key` is, or holds (in tuples and generic aliases' arguments, `depth` levels
        deep), a class or function of the version: for caches keyed on types."""
        if self.defined(key):
            return True
        if depth == 0:
            return False
        if isinstance(key, tuple | list | frozenset):
            return any(self.mentioned(item, depth - 1) for item in key)
        args = getattr(key, "__args__", None) if not isinstance(key, type) else None
        if isinstance(args, tuple):
            origin = getattr(key, "__origin__", None)
            return self.mentioned(args, depth - 1) or self.mentioned(origin, depth - 1)
        return False


Cleaner = Callable[[Unloaded], object]


# -- FastAPI ----------------------------------------------------------------------------------

# `functools.lru_cache`s keyed on endpoint and dependency callables (their `_CallIdentity`) or on
# model classes. An lru_cache cannot drop one entry: we clear it. The cost is that every live
# endpoint is classified again (a few `inspect` calls) on its next use, once per unload.
_FASTAPI_LRU_CACHES = (
    ("fastapi.dependencies.models", "_is_gen_callable_cached"),
    ("fastapi.dependencies.models", "_is_async_gen_callable_cached"),
    ("fastapi.dependencies.models", "_is_coroutine_callable_cached"),
    ("fastapi._compat.v2", "get_cached_model_fields"),
)


def clean_fastapi(unloaded: Unloaded) -> None:
    for module_name, name in _FASTAPI_LRU_CACHES:
        cache = getattr(sys.modules.get(module_name), name, None)
        if cache is not None and cache.cache_info().currsize:
            cache.cache_clear()
    # Keyed on `id(endpoint)`: holds no reference, but a later function at a recycled id would be
    # reported with a retired endpoint's file and line; drop the entries of the version's files.
    contexts = getattr(sys.modules.get("fastapi.routing"), "_endpoint_context_cache", None)
    if isinstance(contexts, dict):
        root = str(unloaded.root)
        for key, context in list(contexts.items()):
            if str(context.get("file", "")).startswith(root):
                contexts.pop(key, None)


# -- pydantic ---------------------------------------------------------------------------------


def clean_pydantic(unloaded: Unloaded) -> None:
    # `Page[Item]` is cached by (Page, (Item,), ...): weak values, but strong keys. The value lives
    # as long as the version (its routes use it), and the key keeps the version alive: a cycle
    # through a global that no collection breaks. Only this version's entries are dropped.
    generics = getattr(sys.modules.get("pydantic._internal._generics"), "_GENERIC_TYPES_CACHE", None)
    if generics is not None:
        # list(.data): one step for the GIL (other versions import in worker threads meanwhile).
        for key in [k for k in list(getattr(generics, "data", ())) if unloaded.mentioned(k)]:
            generics.pop(key, None)
    # A TypeAdapter per URL class: only a package's own AnyUrl subclass would be the version's;
    # cleared only then (the cost: shared URL types build their adapter again).
    adapters = getattr(sys.modules.get("pydantic.networks"), "_build_type_adapter", None)
    if adapters is not None and adapters.cache_info().currsize and _defines_url_types(unloaded):
        adapters.cache_clear()


def _defines_url_types(unloaded: Unloaded) -> bool:
    networks = sys.modules.get("pydantic.networks")
    bases = tuple(b for b in (getattr(networks, n, None) for n in ("_BaseUrl", "_BaseMultiHostUrl")) if b)
    return any(unloaded.defined(cls) for base in bases if isinstance(base, type) for cls in _subclasses(base))


def _subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


BUILTIN: dict[str, Cleaner] = {"fastapi": clean_fastapi, "pydantic": clean_pydantic}


# -- running them -----------------------------------------------------------------------------


def run_cleaners(unloaded: Unloaded, cleaners: Iterable[tuple[str, Cleaner]]) -> None:
    """Call each cleaner with `unloaded`; log what one raises (with its name), never raise."""
    for label, cleaner in cleaners:
        try:
            cleaner(unloaded)
        except BaseException as exc:  # synchronous: no cancellation can be in it
            logger.error(
                "%s %s: unload cleaner %s raised %s; the version may stay in memory",
                unloaded.package,
                unloaded.version,
                label,
                type(exc).__name__,
                exc_info=exc,
            )


def release(unloaded: Unloaded, plugins: Iterable[tuple[str, Cleaner]] = ()) -> None:
    """The built-in cleaners of the libraries already imported, then `plugins` (the
    `hotdeploy_unloaded` implementations). Synchronous: it runs in the unload's `finally`."""
    builtin = [(f"builtin {name}", clean) for name, clean in BUILTIN.items() if name in sys.modules]
    run_cleaners(unloaded, [*builtin, *plugins])


# -- collecting -------------------------------------------------------------------------------


class Collector:
    """One full collection after unloads, at a moment `idle()` chooses.

    `unloaded()` asks for it; the collector's task (`run`) waits a `settle` delay (unloads come
    in bursts: a removal, a shutdown), then until `idle()` (the engine: no operation under way,
    no version being loaded, started or checked), and collects once for all of them. `poke()`
    says idleness may have come (an operation ended): it looks again at once rather than at the
    end of the next delay, so that back-to-back deployments leave it the gap between them. If it
    is never idle, it collects anyway after `patience` seconds: garbage left to the automatic
    collector makes its full collections both later and longer (they scan every retired version
    still waiting)."""

    def __init__(
        self,
        idle: Callable[[], bool],
        *,
        settle: float = 0.01,
        patience: float = 2.0,
        look_every: float = 0.01,
    ) -> None:
        self._idle = idle
        self.settle = settle
        self.patience = patience
        self.look_every = look_every  # while not idle (a poke looks at once)
        self._wanted: anyio.Event | None = None  # made by `run`, in its event loop
        self._since: float | None = None  # the first unload not collected yet
        self.collections = 0
        self.last_ms: float | None = None  # how long the last one took (it blocks the loop)
        self._done: anyio.Event | None = None
        self._poked: anyio.Event | None = None

    def unloaded(self) -> None:
        if self._since is None:
            self._since = time.monotonic()
        if self._wanted is not None:
            self._wanted.set()

    def poke(self) -> None:
        """An operation ended: if a collection is pending, look now (see `run`)."""
        if self._since is not None and self._poked is not None:
            self._poked.set()

    @property
    def pending(self) -> bool:
        return self._since is not None

    async def run(self) -> None:
        """The collector's task, for the life of the runtime."""
        # Events of this event loop (a deployer may run again, in another one).
        wanted = self._wanted = anyio.Event()
        self._poked = anyio.Event()
        if self._since is not None:
            wanted.set()
        while True:
            await wanted.wait()
            pause = self.settle  # unloads come in bursts
            while True:
                wanted = self._wanted = anyio.Event()
                with anyio.move_on_after(pause):
                    await self._poked.wait()
                poked = self._poked.is_set()
                since = self._since
                overdue = since is not None and time.monotonic() - since >= self.patience
                # No await between this check and the collection: it never starts mid-operation.
                # After an operation's end (a poke) it collects what is unloaded by then at once:
                # the next deployment may follow straight away.
                if overdue or (self._idle() and (poked or not wanted.is_set())):
                    break
                self._poked = anyio.Event()
                pause = self.settle if wanted.is_set() else self.look_every
            self._poked = anyio.Event()
            self.collect()

    async def wait(self) -> None:
        """Until no collection is pending (for tests and benchmarks)."""
        while self._since is not None:
            self._done = anyio.Event()
            await self._done.wait()

    def collect(self) -> None:
        self._since = None
        started = time.perf_counter()
        gc.collect()
        self.last_ms = (time.perf_counter() - started) * 1000
        self.collections += 1
        if self._done is not None:
            self._done.set()
