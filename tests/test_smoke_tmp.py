from pathlib import Path

import httpx
import pytest

from packages import write_package
from starlette_hotdeploy import Deployer

pytestmark = pytest.mark.anyio


async def test_deploy_and_serve(deployer: Deployer, client: httpx.AsyncClient, sources: Path) -> None:
    record = await deployer.deploy(write_package(sources, version="1.0"))
    assert record.outcome == "succeeded", record
    r = await client.get("/greeter/")
    assert r.json()["version"] == "1.0", r.text
    r = await client.get("/greeter/lazy")
    assert r.json() == {"version": "1.0", "model": "models of greeter 1.0", "same": True}
    await deployer.deploy(write_package(sources, version="2.0"))
    r = await client.get("/greeter/lazy")
    assert r.json() == {"version": "2.0", "model": "models of greeter 2.0", "same": True}
    r = await client.get("/greeter/link")
    assert r.json()["url"] == "http://testserver/greeter/items/7"
    r = await client.get("/greeter/state")
    assert r.json()["owner"] == "greeter 2.0"
    r = await client.get("/")
    assert r.text == "host"
