"""The two apps that `dispatch_uvicorn` serves with uvicorn, as import-string factories.

    uvicorn --factory benchmarks.dispatch_apps:create_mount_app       ($BENCH_PACKAGES mounts)
    uvicorn --factory benchmarks.dispatch_apps:create_hotdeploy_app   (packages of $BENCH_HOME)

Both have the same host route `/` and serve the same tiny sub-app under `/pkg0` ... `/pkgN-1`:
the first through Starlette `Mount`s in its router, the second through HotDeployMiddleware, whose
deployer restores the packages deployed beforehand into the home directory.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from starlette_hotdeploy import Deployer, HotDeployMiddleware

from .tiny_packages import sub_app

PACKAGES_ENV = "BENCH_PACKAGES"
HOME_ENV = "BENCH_HOME"


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("host")


def package_names(count: int) -> list[str]:
    return [f"pkg{i}" for i in range(count)]


def create_mount_app() -> Starlette:
    names = package_names(int(os.environ[PACKAGES_ENV]))
    return Starlette(routes=[Route("/", home), *[Mount(f"/{name}", app=sub_app()) for name in names]])


def create_hotdeploy_app() -> Starlette:
    deployer = Deployer(home=os.environ[HOME_ENV], entry_points=False)
    return Starlette(
        routes=[Route("/", home)],
        middleware=[Middleware(HotDeployMiddleware, deployer=deployer)],
    )
