"""HotDeployRoute: the packages as one route of the host's own routing table.

HotDeployMiddleware sits in the host's middleware stack, so only middleware outside it wraps the
packages. As a route, the packages sit where the host's endpoints sit: every middleware of the
host (auth, sessions, CORS, GZip...) wraps them as it wraps any route, whatever the order.
The dispatch is the middleware's own: the route keeps one and lets it serve what it matched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from starlette.datastructures import URLPath
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.websockets import WebSocketClose

from ._dispatch import HotDeployMiddleware
from ._scope import route_of, route_path
from ._types import Receive, Scope, Send

if TYPE_CHECKING:
    from ._deployer import Deployer

AppLifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


class HotDeployRoute(BaseRoute):
    """Every deployed package, and the admin API when a token is configured, as a route:

        deployer = Deployer(home=".hotdeploy")
        app = Starlette(
            routes=[Route("/", home), HotDeployRoute(deployer, admin_token=token)],
            middleware=[Middleware(ApiKeyMiddleware)],  # guards the packages too
            lifespan=hotdeploy_lifespan(deployer),
        )

    It matches a path under an active package's mount (the mount table is read on each request:
    packages come and go at runtime) or under `admin_prefix`, and nothing else. Routes placed
    before it win over packages, as in any Starlette router. A package sees the scope it sees
    behind the middleware (Starlette `Mount`'s); the bare prefix (`/orders`) is redirected to
    `/orders/` by the host router's `redirect_slashes`. On the host, `url_for("orders:item", ...)`
    builds a URL from the active version's routes, `url_for("orders", path="/x")` one under the
    mount. The admin arguments are the middleware's.
    """

    hotdeploy_packages: ClassVar[bool] = True  # not a host route that a package mount shadows

    def __init__(
        self,
        deployer: Deployer,
        *,
        admin_token: str | None = None,
        admin_read_token: str | None = None,
        admin_prefix: str = "/_hotdeploy",
        max_upload_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.deployer = deployer
        # Behind a router nothing is left to pass on to: what the middleware would hand to the
        # wrapped app gets the router's 404 instead.
        self.dispatch = HotDeployMiddleware(
            _not_found,
            deployer,
            admin_token=admin_token,
            admin_read_token=admin_read_token,
            admin_prefix=admin_prefix,
            max_upload_bytes=max_upload_bytes,
        )

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] in ("http", "websocket") and self.dispatch.takes(route_path(scope)):
            # The version is chosen in handle(): after a `block` switch's gate, like the middleware.
            return Match.FULL, {}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.dispatch(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        package_name, _, child = name.partition(":")
        package = self.deployer.packages.get(package_name)
        version = package.active if package is not None else None
        if package is not None and version is not None:
            if child:
                url: URLPath = route_of(version, package.prefix).url_path_for(child, **path_params)
                return url
            if set(path_params) == {"path"}:
                return URLPath(path=package.prefix + "/" + str(path_params["path"]).lstrip("/"))
        raise NoMatchFound(name, path_params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mounts={len(self.deployer.mounts)})"


def hotdeploy_lifespan(deployer: Deployer, lifespan: AppLifespan | None = None) -> AppLifespan:
    """The host's `lifespan=` for `HotDeployRoute`: runs `deployer` around the host's own
    `lifespan` (optional, its state passes through), in the middleware's order.

    The deployer's runtime opens, the host's startup runs, then the stored packages are restored
    (a failure fails the server's startup), all before the server sends a request. At shutdown
    the packages stop first, then the host's own shutdown runs, then the runtime closes.
    """

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        deployer._attach_host(app)  # its routes: a package mount must not shadow them
        host = lifespan(app) if lifespan is not None else nullcontext()
        async with deployer.started(), host as state:
            await deployer.restore()
            try:
                yield state
            finally:
                with anyio.CancelScope(shield=True):  # even cancelled, packages stop first
                    await deployer.shutdown()

    return run


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """Starlette's `Router.not_found`: a 404 through the host's exception handlers, or a close."""
    if scope["type"] == "websocket":
        await WebSocketClose()(scope, receive, send)
    elif "app" in scope:
        raise HTTPException(status_code=404)
    else:
        await PlainTextResponse("Not Found", status_code=404)(scope, receive, send)
