"""greeter 2.1: a broken release. Its health check fails, so it never receives traffic."""

import anyio
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

VERSION = "2.1"


async def hello(request):
    name = request.query_params.get("name", "world")
    return JSONResponse({"message": f"Hello, {name}!", "version": VERSION})


async def countdown(request):
    async def body():
        for n in range(5, 0, -1):
            yield f"{VERSION} {n}\n"
            await anyio.sleep(0.1)

    return StreamingResponse(body(), media_type="text/plain")


async def echo(websocket: WebSocket):
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(f"{VERSION}: {text}")


async def health(request):
    return PlainTextResponse("database migration missing", status_code=503)


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/countdown", countdown),
        Route("/health", health),
        WebSocketRoute("/echo", echo),
    ]
)
