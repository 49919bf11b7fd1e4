"""Running a sub-app's ASGI lifespan in its own long-lived task.

Starlette does not run the lifespans of mounted apps; we do, one supervisor task per version.
The lifespan must be entered and exited in the same task (an anyio task group opened in it
requires that), so startup and shutdown are requests sent to that task, never run in the
caller's.

The supervisor runs in the deployer's runtime task group: whatever the app raises there, any
BaseException but anyio's cancellation, would end that group and the server with it. It is
caught and becomes the startup or shutdown failure of this one version (or is logged, while the
version serves).
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.abc

from ._errors import LifespanFailed, LifespanTimeout
from ._loader import describe, is_cancellation
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
        """Run startup in a new supervisor task; return once it completed (raise if it did not)."""
        task_group.start_soon(self._supervise, name=f"hotdeploy lifespan {self.label}")
        with anyio.move_on_after(timeout) as scope:
            await self._started.wait()
        if scope.cancelled_caught:
            self._cancel.cancel()
            raise LifespanTimeout(f"lifespan startup did not complete within {timeout:g}s")
        if self._startup_error is not None:
            # An app that reported the failure usually raises right after (Starlette does): let
            # the supervisor finish, so the message names what it raised.
            self._cancel.cancel()
            with anyio.move_on_after(1):
                await self._finished.wait()
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
                self._startup_error = _failed("startup", message.get("message"))
                self._started.set()
            elif kind == "lifespan.shutdown.failed":
                self._shutdown_error = _failed("shutdown", message.get("message"))

        try:
            with self._cancel:
                await self.app(scope, receive, send)
        except BaseException as exc:
            if is_cancellation(exc):
                raise  # the runtime is stopping: ours, not the app's
            self._crashed(exc, step)
        finally:
            if not self._started.is_set():
                if self.supported and self._startup_error is None and not self._cancel.cancel_called:
                    # Returned without answering startup: nothing to run, nothing to stop.
                    self.supported = False
                self._started.set()
            self._finished.set()

    def _crashed(self, exc: BaseException, step: str) -> None:
        """The app raised `exc` (anything but cancellation) while in `step`: record or log it."""
        # SystemExit, KeyboardInterrupt...: always a crash, and a more precise account than the
        # message the app may have sent just before (Starlette sends one, then re-raises).
        crash = not isinstance(exc, Exception)
        if not self._started.is_set():
            if step == "startup" and not crash:
                # Raised before asking for a message: like uvicorn's "auto" mode, treat the app
                # as one without lifespan support (a plain ASGI app asserting "http").
                self.supported = False
                logger.debug("%s: no lifespan support (%r)", self.label, exc)
            else:
                self._startup_error = f"lifespan startup raised {describe(exc)}"
        elif self._startup_error is not None:
            if crash:
                self._startup_error = f"lifespan startup raised {describe(exc)}"
        elif step == "shutdown":
            if self._shutdown_error is None or crash:
                self._shutdown_error = f"lifespan shutdown raised {describe(exc)}"
        else:
            logger.error(
                "%s: lifespan task crashed while serving: %s", self.label, describe(exc), exc_info=exc
            )


def _failed(step: str, text: str | None) -> str:
    line = _last_line(text)
    return f"lifespan {step} failed: {line}" if line else f"lifespan {step} failed"


def _last_line(text: str | None) -> str | None:
    """Starlette reports a lifespan failure with the whole traceback: keep the exception line."""
    if not text:
        return None
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None
