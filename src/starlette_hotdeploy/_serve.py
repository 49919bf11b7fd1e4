"""The package host: an empty Starlette app with the middleware, for `hotdeploy serve`.

It is the embedded default for users who have no app yet, and how operators run a standalone
package server. `create_host_app()` reads its settings from the environment so that it can be
an import-string factory for uvicorn (`--workers` imports it in every worker process).
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ._deployer import Deployer
from ._dispatch import HotDeployMiddleware
from ._thread_hop import thread_hop

HOME_ENV = "HOTDEPLOY_HOME"


def create_host_app(
    home: str | os.PathLike[str] | None = None,
    *,
    admin_token: str | None = None,
    admin_read_token: str | None = None,
) -> Starlette:
    """An app that serves only hot-deployed packages and the admin API."""
    deployer = Deployer(home=Path(home) if home is not None else None)

    async def index(request: Request) -> JSONResponse:
        packages = [
            {"name": p.name, "mount": p.mount, "version": p.active_version}
            for p in await thread_hop(deployer.status)
        ]
        return JSONResponse({"service": "starlette-hotdeploy package host", "packages": packages})

    return Starlette(
        routes=[Route("/", index)],
        middleware=[
            Middleware(
                HotDeployMiddleware,
                deployer=deployer,
                admin_token=admin_token,
                admin_read_token=admin_read_token,
            )
        ],
    )
