"""Running a sub-app's ASGI lifespan in its own long-lived task.

Starlette does not run the lifespans of mounted apps; we do, one supervisor task per version.
The lifespan must be entered and exited in the same task (an anyio task group opened in it
requires that), so startup and shutdown are requests sent to that task, never run in the
caller's.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.abc

from ._errors import LifespanFailed, LifespanTimeout
from ._types import ASGIApp, Message

logger = logging.getLogger("starlette_hotdeploy")


class Lifespan:
    """One app's lifespan: `await start(tg)` then, later, `await stop()`."""

    def __init__(self, app: ASGIApp, label: str) -> None:
        self.app = app
        self.label = label
        self.state: dict[str, Any] = {}
        self.supported = True
        self._started = anyio.Event()
        self._stop_requested = anyio.Event()
        self._finished = anyio.Event()
        self._startup_error: str | None = None
        self._shutdown_error: str | None = None
        self._cancel = anyio.CancelScope()
        self._sent_startup_reply = False

    async def start(self, task_group: anyio.abc.TaskGroup, timeout: float) -> None:
        """Run startup in a new supervisor task; return once it completed."""
        task_group.start_soon(self._supervise, name=f"hotdeploy lifespan {self.label}")
        with anyio.move_on_after(timeout) as scope:
            await self._started.wait()
        if scope.cancelled_caught:
            self._cancel.cancel()
            raise LifespanTimeout(f"lifespan startup did not complete within {timeout:g}s")
        if self._startup_error is not None:
            raise LifespanFailed(self._startup_error)

    async def stop(self, timeout: float) -> None:
        """Run shutdown in the supervisor task; cancel it if it overruns `timeout`."""
        self._stop_requested.set()
        with anyio.move_on_after(timeout) as scope:
            await self._finished.wait()
        if scope.cancelled_caught:
            self._cancel.cancel()
            with anyio.move_on_after(5):
                await self._finished.wait()
            raise LifespanTimeout(f"lifespan shutdown did not complete within {timeout:g}s")
        if self._shutdown_error is not None:
            raise LifespanFailed(self._shutdown_error)

    def abort(self) -> None:
        """Cancel the supervisor without a shutdown (used when startup failed or timed out)."""
        self._cancel.cancel()

    async def _supervise(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        step = "startup"

        async def receive() -> Message:
            nonlocal step
            if step == "startup":
                step = "running"
                return {"type": "lifespan.startup"}
            await self._stop_requested.wait()
            step = "shutdown"
            return {"type": "lifespan.shutdown"}

        async def send(message: Message) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                self._started.set()
            elif kind == "lifespan.startup.failed":
                self._startup_error = _last_line(message.get("message")) or "lifespan startup failed"
                self._started.set()
            elif kind == "lifespan.shutdown.failed":
                self._shutdown_error = _last_line(message.get("message")) or "lifespan shutdown failed"

        try:
            with self._cancel:
                await self.app(scope, receive, send)
        except Exception as exc:
            if not self._started.is_set():
                if step == "startup":
                    # Raised before asking for a message: like uvicorn's "auto" mode, treat the
                    # app as one without lifespan support (a plain ASGI app asserting "http").
                    self.supported = False
                    logger.debug("%s: no lifespan support (%r)", self.label, exc)
                else:
                    self._startup_error = f"{type(exc).__name__}: {exc}"
            elif self._startup_error is not None:
                pass  # already reported with lifespan.startup.failed
            elif step == "shutdown":
                if self._shutdown_error is None:
                    self._shutdown_error = f"{type(exc).__name__}: {exc}"
            else:
                logger.exception("%s: lifespan task crashed while serving", self.label)
        finally:
            if not self._started.is_set():
                if self.supported and self._startup_error is None and not self._cancel.cancel_called:
                    # Returned without answering startup: nothing to run, nothing to stop.
                    self.supported = False
                self._started.set()
            self._finished.set()


def _last_line(text: str | None) -> str | None:
    """Starlette reports a lifespan failure with the whole traceback: keep the exception line."""
    if not text:
        return None
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None
