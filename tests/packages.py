"""Builds test packages on disk: a Starlette sub-app that stamps every answer with its version."""

from __future__ import annotations

import textwrap
import threading
import zipfile
from pathlib import Path

APP = """
import contextlib

import anyio
import testkit
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from . import models

VERSION = "{version}"
NAME = "{name}"


@contextlib.asynccontextmanager
async def lifespan(app):
    testkit.calls.append(f"startup {{NAME}} {{VERSION}}")
    # A task group opened in the lifespan must be closed by the same task.
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.sleep_forever)
        yield {{"owner": f"{{NAME}} {{VERSION}}"}}
        await testkit.shutdown_gate(f"shutdown {{NAME}} {{VERSION}}")
        tg.cancel_scope.cancel()
    testkit.calls.append(f"shutdown {{NAME}} {{VERSION}}")


async def index(request):
    return JSONResponse({{"version": VERSION, "path": request.url.path, "root_path": request.scope["root_path"]}})


async def lazy(request):
    from {name}.models import describe  # absolute and lazy: must resolve to this version

    return JSONResponse({{"version": VERSION, "model": describe(), "same": describe is models.describe}})


async def item(request):
    return JSONResponse({{"version": VERSION, "item": request.path_params["item_id"]}})


async def link(request):
    return JSONResponse({{"version": VERSION, "url": str(request.url_for("item", item_id=7))}})


async def state(request):
    return JSONResponse({{"version": VERSION, "owner": request.state.owner}})


async def hold(request):
    key = request.query_params["key"]
    testkit.event(key + ":entered").set()
    await testkit.event(key).wait()
    return JSONResponse({{"version": VERSION, "held": key}})


async def stream(request):
    key = request.query_params["key"]

    async def body():
        yield f"{{VERSION}} first\\n".encode()
        testkit.event(key + ":entered").set()
        await testkit.event(key).wait()
        yield f"{{VERSION}} last\\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


async def echo(websocket: WebSocket):
    await websocket.accept()
    await websocket.send_text(f"hello from {{VERSION}}")
    async for text in websocket.iter_text():
        await websocket.send_text(f"{{VERSION}}: {{text}}")


async def health(request):
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/", index),
        Route("/lazy", lazy),
        Route("/items/{{item_id:int}}", item, name="item"),
        Route("/link", link),
        Route("/state", state),
        Route("/hold", hold),
        Route("/stream", stream),
        Route("/health", health),
        Route("/only-get", index, methods=["GET"]),
        WebSocketRoute("/ws", echo),
    ],
    lifespan=lifespan,
)
"""

MODELS = """
VERSION = "{version}"


def describe():
    return "models of {name} " + VERSION
"""


# The steps of a deployment that succeeds, in order (the old version's drain follows later).
DEPLOY_STEPS = [
    "unpack",
    "manifest",
    "validate",
    "load",
    "start",
    "check",
    "prepare workers",
    "switch",
    "commit",
    "converge",
    "bake",
]


def write_package(
    parent: Path,
    name: str = "greeter",
    version: str = "1.0",
    *,
    mount: str | None = None,
    manifest_extra: str = "",
    files: dict[str, str] | None = None,
    app: str | None = None,
) -> Path:
    """Write a package directory `parent/<name>-<version>/` and return it."""
    root = parent / f"{name}-{version}"
    package = root / name
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "app.py").write_text(app if app is not None else APP.format(name=name, version=version))
    (package / "models.py").write_text(MODELS.format(name=name, version=version))
    for relative, text in (files or {}).items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))
    manifest = (
        f'name = "{name}"\nversion = "{version}"\napp = "{name}.app:app"\n'
        f'mount = "{mount or "/" + name}"\n{textwrap.dedent(manifest_extra)}'
    )
    (root / "hotdeploy.toml").write_text(manifest)
    return root


def zip_directory(directory: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(directory.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                archive.write(path, path.relative_to(directory).as_posix())
    return target


# -- gates for package code that runs in a worker thread (imports, factories) ----------------------
# A package's import runs in a worker thread, where testkit's anyio events cannot be awaited.
# Packages and tests share this module (a third-party import for a package), so package code
# can pause on a threading.Event that the test sets.

_gates: dict[str, threading.Event] = {}
_gates_lock = threading.Lock()


def thread_gate(key: str) -> threading.Event:
    """The threading.Event named `key` (created on first use, from any thread)."""
    with _gates_lock:
        return _gates.setdefault(key, threading.Event())


def release_thread_gates() -> None:
    """Open every gate (no package thread stays paused) and forget them."""
    with _gates_lock:
        gates = list(_gates.values())
        _gates.clear()
    for gate in gates:
        gate.set()


# -- a FastAPI package: pydantic models, response models, a path param, a body, a dependency -----

FASTAPI_APP = """
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel

from .models import Item, ItemIn, ItemPage, Paging, Tag

VERSION = "{version}"

app = FastAPI(title="{name}", version=VERSION)
_items: dict[int, Item] = {{}}


class Version(BaseModel):
    version: str


def paging(limit: int = 10, offset: int = 0) -> Paging:
    return Paging(limit=limit, offset=offset)


async def current_tag(tag: str = "default") -> Tag:
    return Tag(name=tag)


@app.get("/", response_model=Version)
async def index() -> Version:
    return Version(version=VERSION)


@app.get("/health")
def health() -> dict[str, str]:
    return {{"status": "ok"}}


@app.get("/items", response_model=ItemPage)
async def list_items(page: Annotated[Paging, Depends(paging)]) -> ItemPage:
    values = list(_items.values())
    return ItemPage(items=values[page.offset : page.offset + page.limit], total=len(values))


@app.get("/items/{{item_id}}", response_model=Item)
async def get_item(item_id: int, tag: Annotated[Tag, Depends(current_tag)]) -> Item:
    if item_id not in _items:
        return Item(id=item_id, name=f"item {{item_id}}", price=1.0, tags=[tag], version=VERSION)
    return _items[item_id]


@app.post("/items", response_model=Item, status_code=201)
async def create_item(body: ItemIn, tag: Annotated[Tag, Depends(current_tag)]) -> Item:
    if body.price < 0:
        raise HTTPException(422, "negative price")
    item = Item(id=len(_items) + 1, name=body.name, price=body.price, tags=[tag, *body.tags], version=VERSION)
    _items[item.id] = item
    return item
"""

FASTAPI_MODELS = """
from typing import Generic, TypeVar

from pydantic import BaseModel, Field, field_validator

T = TypeVar("T")


class Tag(BaseModel):
    name: str


class Paging(BaseModel):
    limit: int = Field(10, ge=1, le=100)
    offset: int = Field(0, ge=0)


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int


class ItemIn(BaseModel):
    name: str = Field(min_length=1)
    price: float
    tags: list[Tag] = []

    @field_validator("name")
    @classmethod
    def stripped(cls, value: str) -> str:
        return value.strip()


class Item(ItemIn):
    id: int
    version: str


ItemPage = Page[Item]  # parametrized where its argument's validator lives (pydantic's cache)
"""


def write_fastapi_package(parent: Path, name: str = "shop", version: str = "1.0") -> Path:
    """A FastAPI package `parent/<name>-<version>/`: GET /, /health, /items (a generic
    `Page[Item]`), /items/{item_id}, POST /items (a validated JSON body), with dependencies;
    every item answer carries the version."""
    root = parent / f"{name}-{version}"
    package = root / name
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "app.py").write_text(FASTAPI_APP.format(name=name, version=version))
    (package / "models.py").write_text(FASTAPI_MODELS)
    (root / "hotdeploy.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\napp = "{name}.app:app"\nmount = "/{name}"\nhealth = "/health"\n'
    )
    return root
