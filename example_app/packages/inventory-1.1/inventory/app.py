"""inventory 1.1: opens a resource (an sqlite database) in its lifespan and declares a health path.

Each version has its own connection: it is opened before the version receives traffic and closed
after the version drained, never while a request still uses it.
"""

import contextlib

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from inventory.db import open_database

VERSION = "1.1"


@contextlib.asynccontextmanager
async def lifespan(app):
    connection = open_database()
    try:
        yield {"db": connection}
    finally:
        connection.close()


async def stock(request):
    rows = request.state.db.execute("SELECT sku, quantity FROM stock ORDER BY sku").fetchall()
    return JSONResponse({"version": VERSION, "stock": dict(rows)})


async def item(request):
    row = request.state.db.execute(
        "SELECT quantity FROM stock WHERE sku = ?", (request.path_params["sku"],)
    ).fetchone()
    if row is None:
        return JSONResponse({"version": VERSION, "error": "unknown sku"}, status_code=404)
    return JSONResponse({"version": VERSION, "sku": request.path_params["sku"], "quantity": row[0]})


async def health(request):
    request.state.db.execute("SELECT 1").fetchone()
    return PlainTextResponse("ok")


app = Starlette(
    routes=[Route("/", stock), Route("/items/{sku}", item), Route("/health", health)],
    lifespan=lifespan,
)
