"""The host app of the restart-based upgrade methods: a plain Starlette app that mounts the
greeter version found on disk when the worker process starts.

`$BENCH_GREETER_DIR` is a symlink to `example_app/packages/greeter-1.0` (or `-2.0`): the upgrade
swaps the link and then restarts the workers (uvicorn or gunicorn `SIGHUP`, or a stop and a
start), so every new worker process imports the version the link points to then.

    uvicorn --factory benchmarks.restart_host:create_app
    gunicorn -k uvicorn_worker.UvicornWorker 'benchmarks.restart_host:create_app()'
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

GREETER_DIR_ENV = "BENCH_GREETER_DIR"


async def pid(request: Request) -> PlainTextResponse:
    """Which worker process answered (to wait until every worker is up)."""
    return PlainTextResponse(str(os.getpid()))


def load_greeter() -> ASGIApp:
    """Import `greeter.app` from the package directory the symlink points to now."""
    directory = Path(os.environ[GREETER_DIR_ENV]).resolve()
    sys.path.insert(0, str(directory))
    app: ASGIApp = importlib.import_module("greeter.app").app
    return app


def create_app() -> Starlette:
    return Starlette(routes=[Route("/_pid", pid), Mount("/greeter", app=load_greeter())])
