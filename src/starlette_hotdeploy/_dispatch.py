"""HotDeployMiddleware: the versioned dispatch layer in front of the host app."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.datastructures import URL
from starlette.responses import RedirectResponse

from ._scope import mounted_scope, route_path
from ._types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ._deployer import Deployer

logger = logging.getLogger("starlette_hotdeploy")


class HotDeployMiddleware:
    """Pure ASGI middleware: requests under a deployed package's mount go to its active version;
    everything else reaches the wrapped app untouched.

        deployer = Deployer(home=".hotdeploy", plugins=[...])
        app = Starlette(routes=..., middleware=[Middleware(HotDeployMiddleware, deployer=deployer)])

    The admin API is served under `admin_prefix` when a token is configured (`admin_token=` or
    $HOTDEPLOY_ADMIN_TOKEN; an optional read-only token may only GET); otherwise it is off and
    those paths reach the wrapped app like any other.

    Without `deployer=`, a `Deployer()` with default settings is created (its home is
    `$HOTDEPLOY_HOME` or `./.hotdeploy`); reach it as `middleware.deployer`. The middleware also
    runs the deployer for the lifetime of the server's lifespan: packages start after the host app
    started and are shut down before it shuts down.

    Only middleware added outside it wraps the packages (docs/operations.md, "Where the middleware
    sits"); `HotDeployRoute` serves them from the host's own routing table instead.
    """

    def __init__(
        self,
        app: ASGIApp,
        deployer: Deployer | None = None,
        *,
        admin_token: str | None = None,
        admin_read_token: str | None = None,
        admin_prefix: str = "/_hotdeploy",
        max_upload_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        from ._admin import create_admin_app
        from ._deployer import Deployer

        self.app = app
        self.deployer = deployer if deployer is not None else Deployer()
        self._mounts = self.deployer._mount_table
        self.deployer._attach_host(app)  # its routes: a package mount must not shadow them
        self._host = app if hasattr(app, "url_path_for") else None
        self.admin_prefix = admin_prefix.rstrip("/")
        if not self.admin_prefix.startswith("/"):
            raise ValueError(
                f"admin_prefix must be a path below the root, like '/_hotdeploy': {admin_prefix!r}"
            )
        self.admin = create_admin_app(
            self.deployer,
            token=admin_token,
            read_token=admin_read_token,
            prefix=self.admin_prefix,
            max_upload_bytes=max_upload_bytes,
        )
        if self.admin is not None:
            # In the mount table: one lookup finds the admin API or a package.
            self._mounts.reserve(self.admin_prefix, "the admin API")

    def takes(self, path: str) -> bool:
        """Whether `__call__` serves a request for the route path `path` itself (the admin API, or
        a package past its mount's prefix) instead of passing it to the wrapped app. The bare
        prefix is left out: behind a router, `redirect_slashes` redirects it, as for a `Mount`.
        HotDeployRoute matches on this: keep it in step with `__call__`, which inlines it for speed."""
        mount = self._mounts.match(path)
        if mount is None:
            return False
        if mount.reserved:
            return self.admin is not None and mount.prefix == self.admin_prefix
        return len(path) != len(mount.prefix)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            path = route_path(scope)
            mount = self._mounts.match(path)
            if mount is not None:
                if mount.reserved:
                    # This middleware's admin API (another's, on the same deployer, is not ours
                    # to serve: the wrapped app gets it).
                    admin = self.admin
                    if admin is not None and mount.prefix == self.admin_prefix:
                        await admin(scope, receive, send)
                        return
                    await self.app(scope, receive, send)
                    return
                gate = mount.gate
                if gate is not None:
                    await gate.wait()  # `block` strategy: held until the switch, never rejected
                version = mount.active
                if version is not None:
                    if len(path) == len(mount.prefix):
                        if kind == "http":
                            # "/orders" -> "/orders/", as Starlette's router does for a Mount.
                            url = URL(scope={**scope, "path": scope["path"] + "/"})
                            await RedirectResponse(url=str(url))(scope, receive, send)
                            return
                    else:
                        split = mount.split
                        if split is not None:  # a canary: it picks the version (pin, share)
                            await split.serve(scope, receive, send, version, mount.prefix, self._host)
                            return
                        await version.serve(
                            mounted_scope(scope, mount.prefix, version, self._host), receive, send
                        )
                        return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the host app's lifespan inside the deployer's runtime: the stored packages start
        once the host app's startup completed, and stop before its shutdown begins."""
        phase = "startup"
        replied = False

        async def receive_from_server() -> Message:
            nonlocal phase
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                phase = "shutdown"
                await self.deployer.shutdown()  # packages stop before the host app does
            return message

        async def send_to_server(message: Message) -> None:
            nonlocal replied
            replied = True
            if message["type"] == "lifespan.startup.complete":
                message = await self._restore() or message
            await send(message)

        async def speak_for_host() -> None:
            # The host app has no lifespan support (it raised or returned without a word):
            # answer the server for it, so that the packages still get theirs.
            await send(await self._restore() or {"type": "lifespan.startup.complete"})
            while (await receive_from_server())["type"] != "lifespan.shutdown":
                pass
            await send({"type": "lifespan.shutdown.complete"})

        async with self.deployer.started():
            try:
                await self.app(scope, receive_from_server, send_to_server)
            except Exception:
                if replied:
                    raise
                await speak_for_host()
                return
            if phase == "startup" and not replied:
                await speak_for_host()

    async def _restore(self) -> Message | None:
        """Bring the stored packages back; a failure is the server's startup failure."""
        try:
            await self.deployer.restore()
        except Exception as exc:
            logger.exception("restoring the deployed packages failed")
            return {
                "type": "lifespan.startup.failed",
                "message": f"starlette-hotdeploy: {type(exc).__name__}: {exc}",
            }
        return None
