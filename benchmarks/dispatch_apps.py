"""The sub-apps and host apps of the dispatch benchmarks (`dispatch_overhead`, `dispatch_uvicorn`).

Two sub-apps, each written on disk as a package (`write_package`):

- `tiny`: a Starlette app with one route, `GET /hello`, that answers its version as text.
- `fastapi`: a FastAPI app with pydantic models: `GET /items/{item_id}` with a `response_model`,
  and `POST /items` with a validated JSON body (the answer also goes through the response model).

The *same files* are served three ways, by the three host apps (import-string factories for
`uvicorn --factory`, configured through the environment variables below):

    benchmarks.dispatch_apps:create_mount_app        a Starlette `Mount` per package, its app
                                                     imported normally from $BENCH_SOURCES
    benchmarks.dispatch_apps:create_middleware_app   HotDeployMiddleware, the packages of $BENCH_HOME
    benchmarks.dispatch_apps:create_route_app        HotDeployRoute in the host's routes

Each host also has its own route `/` and `/_bench`, which says which event loop and which HTTP
implementation the server runs (what uvicorn's `auto` chose).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import BaseRoute, Mount, Route

from starlette_hotdeploy import Deployer, HotDeployMiddleware, HotDeployRoute, hotdeploy_lifespan
from starlette_hotdeploy._types import ASGIApp

PACKAGES_ENV = "BENCH_PACKAGES"
HOME_ENV = "BENCH_HOME"
SOURCES_ENV = "BENCH_SOURCES"
APP_ENV = "BENCH_APP"

# nometrics: HotDeployMiddleware with Deployer(metrics=False), the cost of counting requests.
KINDS = ("mount", "middleware", "route", "nometrics")
# canary: HotDeployMiddleware with a canary of the target package at 50% (asked for by name).
ALL_KINDS = (*KINDS, "canary")
# What every request of a run with the canary kind carries (every kind gets the same headers):
# the cookie a returning user has, so the canary's sticky path (cookie, hash) is measured.
CANARY_COOKIE = "hotdeploy_canary=5f0c9e2ab1d34e77"
LABELS = {
    "mount": "Starlette Mount",
    "middleware": "HotDeployMiddleware",
    "route": "HotDeployRoute",
    "nometrics": "Middleware, no metrics",
    "canary": "Middleware, canary 50%",
    "host": "host endpoint",
}

TINY_SOURCE = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

VERSION = "@VERSION@"


async def hello(request):
    return PlainTextResponse(VERSION)


app = Starlette(routes=[Route("/hello", hello)])
"""

FASTAPI_SOURCE = """
from fastapi import FastAPI
from pydantic import BaseModel, Field

VERSION = "@VERSION@"


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    price: float = Field(gt=0)
    quantity: int = Field(default=1, ge=0)
    tags: list[str] = []


class Item(ItemIn):
    id: int
    version: str


app = FastAPI()


@app.get("/items/{item_id}", response_model=Item)
async def read_item(item_id: int) -> Item:
    return Item(id=item_id, name=f"item {item_id}", price=9.5, quantity=3, tags=["a", "b"], version=VERSION)


@app.post("/items", response_model=Item, status_code=201)
async def create_item(item: ItemIn) -> Item:
    return Item(id=42, version=VERSION, **item.model_dump())
"""

SOURCES = {"tiny": TINY_SOURCE, "fastapi": FASTAPI_SOURCE}


@dataclass(frozen=True)
class Call:
    """One kind of request to a sub-app: method, path under its mount, body, expected status."""

    name: str
    method: str
    path: str
    body: bytes = b""
    status: int = 200

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        if not self.body:
            return []
        return [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())]


CALLS: dict[str, tuple[Call, ...]] = {
    "tiny": (Call("GET /hello", "GET", "/hello"),),
    "fastapi": (
        Call("GET /items/{id}", "GET", "/items/7"),
        Call(
            "POST /items",
            "POST",
            "/items",
            b'{"name": "widget", "price": 12.5, "quantity": 2, "tags": ["x", "y", "z"]}',
            201,
        ),
    ),
}


def package_names(count: int, app: str = "tiny") -> list[str]:
    prefix = "pkg" if app == "tiny" else "api"
    return [f"{prefix}{i}" for i in range(count)]


def write_package(parent: Path, name: str, app: str = "tiny", version: str = "1.0") -> Path:
    """Write package `name` `version` with the `app` sub-app under `parent/name-version` (if it is
    not there yet) and return its directory."""
    root = parent / f"{name}-{version}"
    if root.exists():
        return root
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (root / name / "app.py").write_text(SOURCES[app].replace("@VERSION@", version))
    (root / "hotdeploy.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\napp = "{name}.app:app"\nmount = "/{name}"\n'
    )
    return root


def import_sub_app(sources: Path, name: str, version: str = "1.0") -> ASGIApp:
    """Package `name`'s app, imported the ordinary way (`import name.app`) from its directory."""
    root = str(sources / f"{name}-{version}")
    sys.path.insert(0, root)
    try:
        module = importlib.import_module(f"{name}.app")
    finally:
        sys.path.remove(root)
    app: ASGIApp = module.app
    return app


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("host")


async def bench_info(request: Request) -> JSONResponse:
    """The event loop and HTTP implementation of the server that runs this app."""
    loop = type(asyncio.get_running_loop())
    http = sorted(m.rsplit(".", 1)[-1] for m in sys.modules if m.startswith("uvicorn.protocols.http."))
    return JSONResponse({"loop": f"{loop.__module__}.{loop.__qualname__}", "http": http})


def host_routes() -> list[BaseRoute]:
    return [Route("/", home), Route("/_bench", bench_info)]


def mount_app(sources: Path, names: Sequence[str]) -> Starlette:
    """A Starlette host with a `Mount` per package, each app imported from `sources`."""
    mounts = [Mount(f"/{name}", app=import_sub_app(sources, name)) for name in names]
    return Starlette(routes=[*host_routes(), *mounts])


def middleware_app(deployer: Deployer) -> Starlette:
    """A Starlette host with HotDeployMiddleware (which drives `deployer` in the lifespan)."""
    return Starlette(routes=host_routes(), middleware=[Middleware(HotDeployMiddleware, deployer=deployer)])


def route_app(deployer: Deployer) -> Starlette:
    """A Starlette host with HotDeployRoute last in its routes, `hotdeploy_lifespan` for the rest."""
    return Starlette(routes=[*host_routes(), HotDeployRoute(deployer)], lifespan=hotdeploy_lifespan(deployer))


def _env() -> dict[str, Any]:
    app = os.environ.get(APP_ENV, "tiny")
    return {"app": app, "names": package_names(int(os.environ[PACKAGES_ENV]), app)}


def create_mount_app() -> Starlette:
    return mount_app(Path(os.environ[SOURCES_ENV]), _env()["names"])


def create_middleware_app() -> Starlette:
    return middleware_app(Deployer(home=os.environ[HOME_ENV], entry_points=False))


def create_nometrics_app() -> Starlette:
    return middleware_app(Deployer(home=os.environ[HOME_ENV], entry_points=False, metrics=False))


def create_canary_app() -> Starlette:
    """The middleware host, and `POST /_bench/canary`: start a canary (version 1.1, 50% of the
    users, kept by the middleware's cookie) of the target package, the last one."""
    deployer = Deployer(home=os.environ[HOME_ENV], entry_points=False)
    env = _env()

    async def start_canary(request: Request) -> JSONResponse:
        name = env["names"][-1]
        source = write_package(Path(os.environ[SOURCES_ENV]), name, env["app"], version="1.1")
        record = await deployer.deploy(source, canary="50%")
        return JSONResponse(record.to_dict(), status_code=202)

    routes = [*host_routes(), Route("/_bench/canary", start_canary, methods=["POST"])]
    return Starlette(routes=routes, middleware=[Middleware(HotDeployMiddleware, deployer=deployer)])


def create_route_app() -> Starlette:
    return route_app(Deployer(home=os.environ[HOME_ENV], entry_points=False))


create_hotdeploy_app = create_middleware_app  # the earlier name
