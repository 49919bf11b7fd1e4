"""HotDeployMiddleware: the versioned dispatch layer in front of the host app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.datastructures import URL
from starlette.responses import RedirectResponse
from starlette.routing import Mount as StarletteMount
from starlette.routing import NoMatchFound

from ._types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from starlette.datastructures import URLPath

    from ._deployer import Deployer
    from ._version import PackageVersion


def route_path(scope: Scope) -> str:
    """The path that routes match on: `path` minus `root_path` (as Starlette computes it)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    if path[len(root_path)] == "/":
        return path[len(root_path) :]
    return path


class VersionRouter:
    """What `scope["router"]` is for a package's requests: `request.url_for` builds URLs from
    *this version's* routes under the mount (also while another version is active), then
    falls back to the host app's routes, like the outermost router of a real `Mount`."""

    __slots__ = ("outer", "route")

    def __init__(self, route: StarletteMount, outer: Any) -> None:
        self.route = route
        self.outer = outer

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        try:
            return self.route.url_path_for(name, **path_params)
        except NoMatchFound:
            if self.outer is None:
                raise
            url: URLPath = self.outer.url_path_for(name, **path_params)
            return url


def attach_routing(version: PackageVersion, prefix: str) -> None:
    """Give a loaded version its Starlette `Mount` (for url_for) and router."""
    assert version.app is not None
    version.route = StarletteMount(prefix, app=version.app)
    version.router = VersionRouter(version.route, None)


def mounted_scope(scope: Scope, prefix: str, version: PackageVersion, host: Any = None) -> Scope:
    """Turn the request's scope into what the sub-app sees under `Mount(prefix, app=...)`.

    Like Starlette's Router, this updates the scope in place: `path` stays whole, the prefix is
    appended to `root_path`, and `app_root_path` keeps the top-level root for `url_for`.
    `host` is where `url_for` falls back to when the scope names no router or app (the
    middleware wraps a Starlette app directly instead of being added to it).
    """
    root_path = scope.get("root_path", "")
    router: VersionRouter = version.router
    outer = scope.get("router") or scope.get("app") or host
    if outer is not router.outer:
        router = version.router = VersionRouter(version.route, outer)
    scope["path_params"] = dict(scope.get("path_params", {}))
    scope["app_root_path"] = scope.get("app_root_path", root_path)
    scope["root_path"] = root_path + prefix
    scope["endpoint"] = version.app
    scope["route"] = version.route
    scope["router"] = router
    if version.state_data:
        # Each version sees its own lifespan state over the host's (uvicorn copies per request too).
        scope["state"] = {**scope.get("state", {}), **version.state_data}
    return scope


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
        self._mounts = self.deployer.mounts
        self._host = app if hasattr(app, "url_path_for") else None
        self.admin_prefix = admin_prefix.rstrip("/")
        self._admin_under = self.admin_prefix + "/"
        self.admin = create_admin_app(
            self.deployer,
            token=admin_token,
            read_token=admin_read_token,
            prefix=self.admin_prefix,
            max_upload_bytes=max_upload_bytes,
        )
        if self.admin is not None:
            self._mounts.reserve(self.admin_prefix, "the admin API")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            path = route_path(scope)
            admin = self.admin
            if admin is not None and (path == self.admin_prefix or path.startswith(self._admin_under)):
                await admin(scope, receive, send)
                return
            mount = self._mounts.match(path)
            if mount is not None:
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
                        await version.serve(
                            mounted_scope(scope, mount.prefix, version, self._host), receive, send
                        )
                        return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the host app's lifespan inside the deployer's runtime."""
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
            await send(message)

        async def speak_for_host() -> None:
            # The host app has no lifespan support (it raised or returned without a word):
            # answer the server for it, so that the packages still get theirs.
            await send({"type": "lifespan.startup.complete"})
            while (await receive_from_server())["type"] != "lifespan.shutdown":
                pass
            await send({"type": "lifespan.shutdown.complete"})

        async with self.deployer.running():
            try:
                await self.app(scope, receive_from_server, send_to_server)
            except Exception:
                if replied:
                    raise
                await speak_for_host()
                return
            if phase == "startup" and not replied:
                await speak_for_host()
