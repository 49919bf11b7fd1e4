"""PackageVersion: one loaded version of a package, its state, in-flight work and lifespan."""

from __future__ import annotations

import enum
import time
import weakref
from collections.abc import Awaitable, Mapping
from contextlib import suppress
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ._errors import IllegalTransition, RequestAborted
from ._figures import RequestFigures
from ._lifespan import Lifespan
from ._loader import Namespace, load_app
from ._manifest import Manifest
from ._tasks import CancelledError, Task, current_task, on_asyncio
from ._types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    import pluggy


class VersionState(enum.StrEnum):
    """Where a version is in its life (see TRANSITIONS for the legal moves)::

    staged -> starting -> ready -> active -> draining -> stopping -> retired
                                     ^          |
                                     +----------+  warm switch back (while held)
    any state before stopping, and stopping itself, -> failed
    """

    STAGED = "staged"  # unpacked, manifest valid, nothing imported
    STARTING = "starting"  # imported, lifespan startup running
    READY = "ready"  # started and checked; receives no traffic, or a canary's share (Mount.split)
    ACTIVE = "active"  # the mount points at it
    DRAINING = "draining"  # replaced; finishing what it had; may still be switched back to
    STOPPING = "stopping"  # its retirement decided: lifespan shutdown and unload; never back
    RETIRED = "retired"  # shut down and unloaded
    FAILED = "failed"  # a step failed; discarded

    @property
    def loaded(self) -> bool:
        """Its app can still serve (or be switched to)."""
        return self in _LIVE


_LIVE = frozenset({VersionState.STARTING, VersionState.READY, VersionState.ACTIVE, VersionState.DRAINING})

TRANSITIONS: dict[VersionState, frozenset[VersionState]] = {
    VersionState.STAGED: frozenset({VersionState.STARTING, VersionState.STOPPING, VersionState.FAILED}),
    VersionState.STARTING: frozenset({VersionState.READY, VersionState.STOPPING, VersionState.FAILED}),
    VersionState.READY: frozenset(
        {VersionState.ACTIVE, VersionState.DRAINING, VersionState.STOPPING, VersionState.FAILED}
    ),
    VersionState.ACTIVE: frozenset({VersionState.DRAINING}),
    VersionState.DRAINING: frozenset({VersionState.ACTIVE, VersionState.STOPPING, VersionState.FAILED}),
    VersionState.STOPPING: frozenset({VersionState.RETIRED, VersionState.FAILED}),
    VersionState.RETIRED: frozenset(),
    VersionState.FAILED: frozenset(),
}


class PackageVersion:
    """One version of a package, loaded under its own module namespace.

    `serve()` is the only method on the request path: it tracks the request (its task on
    asyncio, a cancel scope elsewhere) so that a drain timeout can end it, and wakes a waiting
    drain when the last one leaves.
    """

    def __init__(
        self, manifest: Manifest, root: Path, sha256: str, *, top_level: frozenset[str] | None = None
    ) -> None:
        self.manifest = manifest
        self.root = root
        self.sha256 = sha256
        self.top_level = top_level  # its top-level module names, if already read (else at load)
        self._state = VersionState.STAGED
        self.app: ASGIApp | None = None
        self.state_data: dict[str, Any] = {}  # the lifespan state, copied into each request
        self.namespace: Namespace | None = None
        self.plugins: pluggy.PluginManager | None = None  # the package's own hooks (manifest `hooks`)
        self.router: Any = None  # set by the dispatch layer: url_for under the mount
        self.route: Any = None
        self.error: str | None = None
        self.loaded_at = time.time()
        self.activated_at: float | None = None
        self.terminated = 0  # requests ended by a drain timeout
        self.served = 0
        self.figures: RequestFigures | None = None  # set when metrics are on: its HTTP requests
        self.started = False  # lifespan startup completed: owes a shutdown
        self._lifespan: Lifespan | None = None
        # In flight: the requests' asyncio tasks, or their cancel scopes on other backends
        # (_tasks.py says why); a drain timeout cancels them.
        self._open: set[Task[Any] | anyio.CancelScope] = set()
        self._ending: set[Task[Any]] = set()  # tasks cancelled by `terminate`
        self._by_task = False  # decided in `start`, on the loop that will serve
        self._idle: anyio.Event | None = None
        # Package dependencies: the required versions this one imports from (by package name),
        # and the loaded versions bound to this one.
        self.bound_to: dict[str, PackageVersion] = {}
        self.dependents: set[PackageVersion] = set()
        self._unbound: anyio.Event | None = None

    def twin(self) -> PackageVersion:
        """A new instance of the same files (a dependent bound anew to what it requires)."""
        return PackageVersion(self.manifest, self.root, self.sha256, top_level=self.top_level)

    @property
    def state(self) -> VersionState:
        return self._state

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def __repr__(self) -> str:
        return f"<PackageVersion {self.name} {self.version} {self.state.value} in_flight={self.in_flight}>"

    def can_become(self, to: VersionState) -> bool:
        return to in TRANSITIONS[self._state]

    def transition(self, to: VersionState) -> None:
        """The only way a version changes state: raises IllegalTransition for a move that
        TRANSITIONS does not allow (a bug, never a user error)."""
        if not self.can_become(to):
            raise IllegalTransition(
                f"cannot go from {self.state.value} to {to.value}",
                package=self.name,
                version=self.version,
                step="state",
            )
        self._state = to
        if to is VersionState.ACTIVE:
            self.activated_at = time.time()

    # -- loading and lifespan -------------------------------------------------------------

    def open_namespace(self, bound_to: Mapping[str, PackageVersion] | None = None) -> Namespace:
        """Give the version its private module namespace (before `load`; `unload` closes it),
        bound to loaded versions of its requirements: their modules are the ones it imports."""
        self.bound_to = dict(bound_to or {})
        namespaces = [v.namespace for v in self.bound_to.values() if v.namespace is not None]
        namespace = Namespace(self.manifest, self.root, namespaces, self.top_level)
        namespace.open()
        self.namespace = namespace
        for required in self.bound_to.values():
            required.dependents.add(self)
        return namespace

    def unbind(self) -> None:
        """Unloaded: the versions it was bound to may go too (see `wait_unbound`)."""
        for required in self.bound_to.values():
            required.dependents.discard(self)
            if not required.dependents and required._unbound is not None:
                required._unbound.set()
        self.bound_to = {}

    async def wait_unbound(self) -> None:
        """Until no loaded version is bound to this one (a dependent's requests may still run
        this version's code: it is stopped and unloaded only after them)."""
        while self.dependents:
            self._unbound = anyio.Event()
            await self._unbound.wait()

    def load(self) -> ASGIApp:
        """Import the app in the version's namespace and return it. Blocking, and it keeps
        nothing on the version: the engine runs it in a worker thread and sets `app` once it
        returned, so an import abandoned at its timeout can never become this version's app."""
        namespace = self.namespace
        assert namespace is not None, "open_namespace() first"
        return load_app(namespace, self.manifest)

    async def start(self, task_group: anyio.abc.TaskGroup, timeout: float) -> None:
        """Run the app's lifespan startup in its own supervisor task (raises on failure)."""
        assert self.app is not None, "load() first"
        self.transition(VersionState.STARTING)
        self._by_task = on_asyncio()
        self._lifespan = Lifespan(self.app, f"{self.name} {self.version}")
        self.state_data = self._lifespan.state
        await self._lifespan.start(task_group, timeout)
        self.started = True

    async def stop(self, timeout: float) -> None:
        """Run the lifespan shutdown (after the version drained)."""
        lifespan, self._lifespan = self._lifespan, None
        self.started = False
        if lifespan is not None and lifespan.supported:
            await lifespan.stop(timeout)
        elif lifespan is not None:
            lifespan.abort()

    def abort_startup(self) -> None:
        if self._lifespan is not None:
            self._lifespan.abort()
            self._lifespan = None

    def unload(self) -> list[weakref.ref[Any]]:
        """Drop the modules and the app; return weak references that a collection should clear."""
        refs: list[weakref.ref[Any]] = []
        if self.app is not None:
            with suppress(TypeError):
                refs.append(weakref.ref(self.app))
        if self.namespace is not None:
            refs.extend(weakref.ref(module) for _, module in self.namespace.modules())
            self.namespace.close()
        self.unbind()
        self.app = None
        self.namespace = None
        self.plugins = None
        self.router = None
        self.route = None
        self.state_data = {}
        return refs

    # -- the request path -----------------------------------------------------------------

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.app
        assert app is not None
        self.served += 1
        figures = self.figures
        status = 0  # the response's, once started; counted when the request ends (metrics on)
        started = 0.0
        if figures is not None and scope["type"] == "http":
            respond = send
            started = perf_counter()

            # A plain function that hands back the server's own awaitable: no coroutine of its
            # own per message (the cheapest wrapper there is; counting adds well under 1 us).
            def counted(message: Message) -> Awaitable[None]:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                return respond(message)

            send = counted
        else:
            figures = None
        task = current_task() if self._by_task else None
        if task is None:
            try:
                await self._serve_in_scope(app, scope, receive, send)
            except Exception:
                status = status or 500  # raised before answering: the server answers 500
                raise
            finally:
                if figures is not None and status:
                    figures.observe(status, perf_counter() - started)
            return
        open_ = self._open
        if task in open_:
            # Called again from inside one of this version's requests (a sub-request in the same
            # task): the outer call tracks the task, and ending it ends this call too.
            await app(scope, receive, send)
            return
        open_.add(task)
        ending = self._ending
        try:
            await app(scope, receive, send)
        except CancelledError:
            if task not in ending:
                raise  # the server's cancellation, not a drain timeout's
            ending.discard(task)
            if task.uncancel() > 0:
                raise  # cancelled by someone else as well: theirs goes on
            await self._end_terminated(scope, send)
        except Exception:
            status = status or 500  # raised before answering: the server answers 500
            raise
        finally:
            if task in ending:  # the app swallowed the cancellation: take it back all the same
                ending.discard(task)
                task.uncancel()
            open_.discard(task)
            if not open_ and self._idle is not None:
                self._idle.set()
            if figures is not None and status:
                figures.observe(status, perf_counter() - started)

    async def _serve_in_scope(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """The request path where tasks cannot be cancelled from outside (trio): a cancel scope."""
        cancel = anyio.CancelScope()
        self._open.add(cancel)
        try:
            with cancel:
                await app(scope, receive, send)
            if cancel.cancelled_caught:
                await self._end_terminated(scope, send)
        finally:
            self._open.discard(cancel)
            if not self._open and self._idle is not None:
                self._idle.set()

    async def _end_terminated(self, scope: Scope, send: Send) -> None:
        self.terminated += 1
        reason = f"{self.name} {self.version} retired"
        if scope["type"] == "websocket":
            # 1012 "service restart", as uvicorn does on shutdown: clients reconnect.
            with suppress(Exception):
                await send({"type": "websocket.close", "code": 1012, "reason": reason})
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"retry-after", b"1"),
                        (b"connection", b"close"),
                    ],
                }
            )
        except Exception:
            raise RequestAborted(
                "response still streaming at the drain timeout "
                f"({self.manifest.drain_timeout:g}s): connection aborted",
                package=self.name,
                version=self.version,
                step="drain",
            ) from None
        await send({"type": "http.response.body", "body": f"{reason}; retry\n".encode()})

    # -- draining -------------------------------------------------------------------------

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if `timeout` expired first."""
        with anyio.move_on_after(timeout):
            while self._open:
                if self._idle is None or self._idle.is_set():
                    self._idle = anyio.Event()
                await self._idle.wait()
        return not self._open

    async def terminate(self, grace: float = 5.0) -> int:
        """End whatever is still in flight (websockets: 1012; responses: aborted)."""
        count = len(self._open)
        for handle in list(self._open):
            if isinstance(handle, Task):
                self._ending.add(handle)  # so that `serve` tells this cancellation from others
            handle.cancel()
        await self.wait_idle(grace)
        return count
