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
