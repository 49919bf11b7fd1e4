"""The host app's own routes, so that a package mount never silently shadows one.

The middleware (or the package route) sees the app it wraps; walking down through middleware
(`.app`) and Starlette/FastAPI apps (`.router`) reaches the routing table. Only literal paths are
compared: `/users` and `/users/{id}` lie under a mount `/users`; a catch-all such as
`/{page}` or `/{path:path}` is not counted (it would make every mount a conflict).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._mounts import overlaps

_MAX_DEPTH = 64  # a middleware chain deeper than this is not walked further


@dataclass(frozen=True, slots=True)
class HostRoute:
    path: str  # the literal part of the route's path (before its first parameter)
    kind: str  # "route", "websocket route" or "mount"
    methods: tuple[str, ...] = ()

    def describe(self) -> str:
        methods = f" ({', '.join(self.methods)})" if self.methods else ""
        return f"{self.kind} {self.path}{methods}"


def host_routes(app: Any) -> list[HostRoute]:
    """The routes of the first routing table found under `app` (empty if there is none)."""
    node, depth = app, 0
    while node is not None and depth < _MAX_DEPTH:
        routes = getattr(node, "routes", None)
        if isinstance(routes, list):
            return [route for route in map(_describe, routes) if route is not None]
        node = getattr(node, "router", None) or getattr(node, "app", None)
        depth += 1
    return []


def _describe(route: Any) -> HostRoute | None:
    if getattr(route, "hotdeploy_packages", False):
        return None  # the route that serves packages themselves
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return None  # Host routes and custom ones without a path
    literal = path.split("{", 1)[0]
    partial = literal != path
    if partial:
        literal = literal.rsplit("/", 1)[0]  # `/users/{id}` -> `/users`; `/u{n}` -> ``
    literal = literal.rstrip("/")
    if not literal:
        return None
    kind = type(route).__name__
    if kind == "Mount" or (hasattr(route, "routes") and not hasattr(route, "endpoint")):
        return HostRoute(literal, "mount")
    methods = tuple(sorted(getattr(route, "methods", None) or ()))
    return HostRoute(literal, "websocket route" if "WebSocket" in kind else "route", methods)


def shadowed(mount: str, routes: list[HostRoute]) -> list[HostRoute]:
    """The host routes a package at `mount` would take requests from."""
    found = []
    for route in routes:
        if route.kind == "mount":
            if overlaps(mount, route.path):
                found.append(route)
        elif route.path == mount or route.path.startswith(mount + "/"):
            found.append(route)
    return found
