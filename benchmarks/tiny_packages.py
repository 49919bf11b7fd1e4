"""Small packages written on disk for the in-process benchmarks: a Starlette sub-app with one
route, `/hello`, that answers its package's version."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

SUBAPP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

VERSION = "{version}"


async def hello(request):
    return PlainTextResponse(VERSION)


app = Starlette(routes=[Route("/hello", hello)])
"""


def write_package(parent: Path, name: str, version: str = "1.0") -> Path:
    """Write package `name` `version` under `parent/name-version` and return its directory."""
    root = parent / f"{name}-{version}"
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (root / name / "app.py").write_text(SUBAPP.format(version=version))
    (root / "hotdeploy.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\napp = "{name}.app:app"\nmount = "/{name}"\n'
    )
    return root


def sub_app(version: str = "1.0") -> Starlette:
    """The same sub-app, built in this process (for a plain Starlette `Mount`)."""

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(version)

    return Starlette(routes=[Route("/hello", hello)])
