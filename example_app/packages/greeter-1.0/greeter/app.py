"""greeter 1.0: every answer says which version produced it."""

import anyio
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

VERSION = "1.0"


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
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/countdown", countdown),
        Route("/health", health),
        WebSocketRoute("/echo", echo),
    ]
)
