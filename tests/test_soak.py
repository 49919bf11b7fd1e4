"""The soak of benchmarks/soak.py, short: hot deployments with a rollback every tenth operation,
under steady traffic, on a real uvicorn server with 1 and with 2 workers.

It must end with 0 failed requests, every admin operation answered with success (none refused
as "in progress": each operation is sent after the answer to the one before), and the version
the last operation made active answering on every worker. The rollbacks are timed around the
end of the replaced version's drain (see benchmarks/soak.py), where a rollback could switch
back to a version that the background retirement was unloading.

`HOTDEPLOY_SOAK_SWAPS` sets the number of operations (default 40, that is 4 rollbacks); the long
soak is `python -m benchmarks.soak` (200 by default). Marked `soak`: `-m "not soak"` leaves it out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from benchmarks import soak

SWAPS = int(os.environ.get("HOTDEPLOY_SOAK_SWAPS", "40"))


def report(result: dict[str, Any]) -> str:
    """What the soak saw, and the server's log when something went wrong."""
    text = soak.describe(result)
    log = result.get("server_log_tail")
    return f"{text}\n--- server log (tail):\n{log[-4000:]}" if log else text


@pytest.mark.soak
@pytest.mark.parametrize("workers", [1, 2])
def test_soak_swaps_and_rollbacks_under_traffic(workers: int, tmp_path: Path) -> None:
    config = soak.SoakConfig(swaps=SWAPS, workers=workers)
    result: dict[str, Any] = anyio.run(soak.run_soak, config, tmp_path)
    text = report(result)

    deploys, rollbacks = soak.deploys_in(config), soak.rollbacks_in(config)
    assert result["completed"], text
    assert (result["swaps"], result["deploys"], result["rollbacks"]) == (SWAPS, deploys, rollbacks), text
    assert result["requests"] > 0
    assert result["failed"] == 0, text
    assert result["refused_in_progress"] == 0, text
    assert result["operations_failed"] == 0, text
    expected = {"deploy": {"201": deploys}} | ({"rollback": {"200": rollbacks}} if rollbacks else {})
    assert result["operations"] == expected, text
    assert result["final"]["ok"], text
    assert result["final"]["expected"] == result["final"]["active_version"], text
    assert len(result["final"]["pids_reached"]) == workers, text
    assert result["clean"], text


@pytest.mark.anyio
async def test_the_soak_counts_what_fails() -> None:
    """The measuring stick itself: a 500, a body that is not the package's, a broken connection
    and a cut stream are failed requests, kept with their bodies; a good answer is not."""
    answers = iter(
        [
            httpx.Response(200, json={"version": "3", "pid": 1}),
            httpx.Response(500, text="Internal Server Error"),
            httpx.Response(200, text="host"),
            httpx.Response(200, text="3 start\n"),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers, None)
        if answer is None:
            raise httpx.ReadError("connection reset", request=request)
        return answer

    traffic = soak.Traffic(keep_errors=10)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://soak") as client:
        assert await traffic.get(client, "/soak/", "keep-alive") == "3"
        assert await traffic.get(client, "/soak/", "keep-alive") is None
        assert await traffic.get(client, "/soak/", "new-connection") is None
        assert not await traffic.slow(client, "/soak/slow", "slow")
        assert await traffic.get(client, "/soak/", "keep-alive") is None

    assert sum(traffic.requests.values()) == 5
    assert traffic.failed == {
        "status 500": 1,
        "not the package's answer": 1,
        "incomplete stream": 1,
        "ReadError": 1,
    }
    assert [e["body"] for e in traffic.errors][:2] == ["Internal Server Error", "host"]
    assert traffic.versions == {"3"}
