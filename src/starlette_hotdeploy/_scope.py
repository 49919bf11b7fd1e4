"""The scope a package sees: exactly what Starlette's `Mount(prefix, app=...)` would build.

Below both the middleware (the request path) and the engine (the health probe, routing set up
at load): neither imports the other to reach it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.routing import Mount as StarletteMount
from starlette.routing import NoMatchFound

from ._types import Scope

if TYPE_CHECKING:
    from starlette.datastructures import URLPath

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


def route_of(version: PackageVersion, prefix: str) -> StarletteMount:
    """The version's Starlette `Mount` under `prefix` (for url_for), made on first use: it
    compiles a regular expression, which a restore of 1000 packages paid 1000 times."""
    route: StarletteMount | None = version.route
    if route is None:
        route = version.route = StarletteMount(prefix, app=version.app)
    return route


def mounted_scope(scope: Scope, prefix: str, version: PackageVersion, host: Any = None) -> Scope:
    """Turn the request's scope into what the sub-app sees under `Mount(prefix, app=...)`.

    Like Starlette's Router, this updates the scope in place: `path` stays whole, the prefix is
    appended to `root_path`, and `app_root_path` keeps the top-level root for `url_for`.
    `host` is where `url_for` falls back to when the scope names no router or app (the
    middleware wraps a Starlette app directly instead of being added to it).
    """
    root_path = scope.get("root_path", "")
    router: VersionRouter | None = version.router
    outer = scope.get("router") or scope.get("app") or host
    if router is None or outer is not router.outer:
        router = version.router = VersionRouter(route_of(version, prefix), outer)
    params = scope.get("path_params")
    scope["path_params"] = dict(params) if params else {}  # a Mount builds a new dict too
    scope["app_root_path"] = scope.get("app_root_path", root_path)
    scope["root_path"] = root_path + prefix
    scope["endpoint"] = version.app
    scope["route"] = router.route
    scope["router"] = router
    if version.state_data:
        # Each version sees its own lifespan state over the host's (uvicorn copies per request too).
        scope["state"] = {**scope.get("state", {}), **version.state_data}
    return scope
