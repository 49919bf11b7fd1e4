"""The host: an ordinary Starlette app with the hot-deploy middleware in front of it."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_hotdeploy import Deployer, HotDeployMiddleware

PACKAGES = Path(__file__).parent / "packages"


def create_app(deployer: Deployer, *, admin_token: str | None = None) -> Starlette:
    """The host's own routes, plus packages under their mounts and the admin API."""

    async def home(request: Request) -> JSONResponse:
        return JSONResponse({"host": "example", "packages": [p.name for p in deployer.status()]})

    return Starlette(
        routes=[Route("/", home)],
        middleware=[Middleware(HotDeployMiddleware, deployer=deployer, admin_token=admin_token)],
    )
