"""The admin web UI: three static files shipped in the package, served under `<prefix>/ui/`.

No build step and nothing from a CDN: plain HTML, CSS and JavaScript that call the admin API
with the token the user signs in with (kept in the tab's sessionStorage, never in a cookie).
The files hold no data, so they are served without a token; the Content-Security-Policy
allows nothing but these files and the API on the same origin.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

UI_PATH = "/ui"
FILES = {  # path below <prefix>/ui/ -> (file in ui/, media type)
    "": ("index.html", "text/html; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "app.css": ("app.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("starlette_hotdeploy").joinpath("ui", name).read_bytes()


def ui_routes(prefix: str) -> list[Route]:
    """`<prefix>/ui` redirects to `<prefix>/ui/`, which serves the page and its two files."""
    base = f"{prefix}{UI_PATH}"

    async def redirect(request: Request) -> Response:
        return RedirectResponse(f"{request.scope.get('root_path', '')}{base}/", status_code=308)

    def serve(path: str, name: str, media_type: str) -> Route:
        async def endpoint(request: Request) -> Response:
            return Response(_read(name), media_type=media_type, headers=HEADERS)

        return Route(f"{base}/{path}", endpoint, methods=["GET"])

    files = (serve(path, name, media) for path, (name, media) in FILES.items())
    return [Route(base, redirect, methods=["GET"]), *files]


__all__ = ["UI_PATH", "ui_routes"]
