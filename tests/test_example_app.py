"""The README's demo, shortened: it must keep reporting 0 errors and refuse the broken release."""

from __future__ import annotations

import pytest
from example_app.__main__ import demo
from example_app.host import PACKAGES

from starlette_hotdeploy import AdminProblem
from starlette_hotdeploy.testing import HotDeployServer


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn runs on asyncio only
@pytest.mark.anyio
async def test_demo_reports_no_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert await demo(port=0, phase_seconds=0.5) == 0
    out = capsys.readouterr().out
    assert "0 errors" in out
    assert "422 check failed: greeter 2.1: health check GET /greeter/health answered 503" in out
    assert "'2.0':" in out


# The example's packages, tested the way a package author would: with the pytest plugin.


def test_greeter_upgrades_under_traffic_without_a_failed_request(hotdeploy_server: HotDeployServer) -> None:
    report = hotdeploy_server.upgrade(PACKAGES / "greeter-1.0", PACKAGES / "greeter-2.0", path="/?name=ci")
    assert report.versions_seen == {"1.0", "2.0"}


def test_the_broken_greeter_is_refused_while_2_0_keeps_serving(hotdeploy_server: HotDeployServer) -> None:
    hotdeploy_server.deploy(PACKAGES / "greeter-2.0")
    with pytest.raises(AdminProblem) as refused:
        hotdeploy_server.deploy(PACKAGES / "greeter-2.1-broken")
    assert refused.value.status == 422
    assert "health check GET /greeter/health answered 503" in str(refused.value)
    with hotdeploy_server.client("greeter") as client:
        assert client.get("/").json()["version"] == "2.0"
