"""The README's demo, shortened: it must keep reporting 0 errors and refuse the broken release."""

from __future__ import annotations

import pytest
from example_app.__main__ import demo


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn runs on asyncio only
@pytest.mark.anyio
async def test_demo_reports_no_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert await demo(port=0, phase_seconds=0.5) == 0
    out = capsys.readouterr().out
    assert "0 errors" in out
    assert "422 check failed: greeter 2.1: health check GET /greeter/health answered 503" in out
    assert "'2.0':" in out
