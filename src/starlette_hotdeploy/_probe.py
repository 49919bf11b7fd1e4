"""In-process HTTP requests to a version that receives no traffic yet (the `health` check).

The app is package code: whatever it raises (SystemExit too), but anyio's cancellation, comes
out as `ProbeCrashed`, so that the check fails instead of the server."""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from ._loader import describe, is_cancellation
from ._scope import mounted_scope
from ._types import Message, Scope
from ._version import PackageVersion

_MAX_BODY = 64 * 1024


class ProbeCrashed(Exception):
    """The app raised while answering; the message describes it ('SystemExit(3)')."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(describe(cause))


@dataclass(frozen=True, slots=True)
class ProbeResponse:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


async def probe(version: PackageVersion, path: str, timeout: float) -> ProbeResponse:
    """GET `path` (relative to the mount) from the version's app, in this process.

    Raises TimeoutError past `timeout`, ProbeCrashed if the app raised."""
    app = version.app
    assert app is not None
    prefix = version.manifest.mount
    full_path = prefix + path
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "server": ("hotdeploy.internal", 80),
        "client": ("127.0.0.1", 0),
        "root_path": "",
        "path": full_path,
        "raw_path": full_path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"hotdeploy.internal"), (b"user-agent", b"starlette-hotdeploy-health")],
        "state": {},
    }
    mounted_scope(scope, prefix, version)
    status = 0
    body = bytearray()
    request_sent = False
    done = anyio.Event()

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body":
            if len(body) < _MAX_BODY:
                body.extend(message.get("body", b"")[: _MAX_BODY - len(body)])
            if not message.get("more_body", False):
                done.set()

    with anyio.move_on_after(timeout) as deadline:
        try:
            await app(scope, receive, send)
        except BaseException as exc:
            if is_cancellation(exc):
                raise  # the deadline's (caught just below), or the caller's
            raise ProbeCrashed(exc) from exc
    done.set()
    if deadline.cancelled_caught:
        raise TimeoutError(f"GET {full_path} did not answer within {timeout:g}s")
    return ProbeResponse(status=status, body=bytes(body))
