"""A tiny run of every benchmark scenario (benchmarks/, docs/benchmarks.md), so they cannot rot.

Each scenario runs in a small configuration: one worker, a second or two of load from the
built-in httpx clients (no wrk needed), a few swaps. Only the parts that need `wrk` are skipped
where it is not installed. Numbers are not checked, except the ones that are properties of hot
deployment: no failed request, no broken websocket, no cut stream, no retired version alive.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from benchmarks import cluster, dispatch_overhead, dispatch_uvicorn, many_swaps, upgrade
from benchmarks.loadgen import PlainLoadResult, ProbeStats, StreamStats, WebSocketStats, WrkLoad
from benchmarks.servers import METHODS, HotDeploy, UpgradeCommand, UvicornRestart

TINY = upgrade.UpgradeConfig(
    workers=1,
    connections=2,
    streams=1,
    websockets=1,
    warmup_s=0.2,
    steady_s=1.0,
    after_s=2.0,
    use_wrk=False,
    ws_session_messages=5,
)

UPGRADE_KEYS = {
    "method",
    "failed_requests",
    "connection_errors",
    "time_to_first_new_s",
    "time_to_all_new_s",
    "converged",
    "latency",
    "streams",
    "websockets",
    "probe",
    "timeline",
    "command",
}


@pytest.mark.parametrize("method", list(METHODS))
def test_upgrade_under_load(method: str, tmp_path: Path) -> None:
    if method == "gunicorn-hup" and importlib.util.find_spec("gunicorn") is None:
        pytest.skip("gunicorn is not installed")
    result: dict[str, Any] = anyio.run(upgrade.run_method, method, TINY, tmp_path)

    assert result.keys() >= UPGRADE_KEYS
    assert result["load_tool"] == "httpx"
    assert result["requests"] > 0
    assert set(result["latency"]) == {"steady", "upgrade"}
    assert result["latency"]["steady"]["count"] > 0
    assert len(result["timeline"]["t_s"]) == len(result["timeline"]["p50_ms"]) > 0
    if method == "hotdeploy":
        assert result["command"]["status"] == 201, result["command"]
        assert result["failed_requests"] == 0, result
        assert result["connection_errors"] == 0, result
        assert result["probe"]["failed"] == 0, result["probe"]
        assert result["websockets"]["broken"] == 0, result["websockets"]
        assert result["websockets"]["mixed"] == 0, result["websockets"]
        assert result["streams"]["cut"] == 0, result["streams"]
        assert result["converged"], result["timeline"]["new_share"]
        assert result["time_to_first_new_s"] is not None
    assert result["label"] in upgrade.table([result])


def test_wrk_timeline(tmp_path: Path) -> None:
    """wrk with timeline.lua: per-response lines with the answering version."""
    if not WrkLoad.available():
        pytest.skip("wrk is not installed (benchmarks/setup_env.py installs it)")
    server = UvicornRestart(tmp_path, 1)
    try:
        server.start()
        load = WrkLoad(server.url("/greeter/"), 2, 1, tmp_path)
        load.start()
        result = anyio.run(load.finish)
    finally:
        server.stop()
    assert result.tool == "wrk"
    assert result.failed == 0
    assert result.requests > 0
    assert len(result.samples) >= result.requests - 2  # wrk may not count a last one
    assert {version for *_, version in result.samples} == {"1.0"}


def test_dispatch_in_process() -> None:
    results = anyio.run(dispatch_overhead.run, 200, (1, 3), 1)
    cases = {(r["kind"], r["packages"]) for r in results}
    kinds = ("mount", "middleware", "route")
    assert cases == {(kind, n) for kind in kinds for n in (1, 3)} | {("host", 3)}
    rows = dispatch_overhead.overheads(results)
    assert {(row["kind"], row["packages"]) for row in rows} == {(k, n) for k in kinds[1:] for n in (1, 3)}
    assert all(r["mean_us"] > 0 for r in results)
    assert "HotDeployMiddleware" in dispatch_overhead.table(results)


@pytest.mark.parametrize("tool", ["httpx", "wrk"])
def test_dispatch_through_uvicorn(tool: str) -> None:
    if tool == "wrk" and shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (benchmarks/setup_env.py installs it)")
    config = dispatch_uvicorn.DispatchConfig(
        scales=(2,),
        rounds=1,
        seconds=0.5 if tool == "wrk" else 0.3,
        scale_rounds=1,
        scale_seconds=0.5 if tool == "wrk" else 0.3,
        warmup_s=0.1,
        connections=2,
        use_wrk=tool == "wrk",
    )
    results = dispatch_uvicorn.run(config)
    kinds = ("mount", "middleware", "route", "nometrics")
    # The FastAPI app with one package, the tiny one with two.
    assert {(r["app"], r["kind"], r["packages"]) for r in results} == {
        (app, kind, n) for app, n in (("fastapi", 1), ("tiny", 2)) for kind in kinds
    }
    assert all(r["rps"] > 0 and r["errors"] == 0 for r in results)
    rows = dispatch_uvicorn.overheads(results)
    assert {(row["app"], row["kind"]) for row in rows} == {
        (app, k) for app in ("fastapi", "tiny") for k in kinds[1:]
    }
    assert all(row["rps_ratio"]["min"] > 0 for row in rows)
    costs = dispatch_uvicorn.metrics_cost(results)
    assert {(row["app"], row["packages"]) for row in costs} == {("fastapi", 1), ("tiny", 2)}


def test_many_swaps() -> None:
    result = anyio.run(many_swaps.run, 3, 1)
    assert result["swaps"] == 3
    assert len(result["swap_latencies_ms"]) == len(result["rss_curve_kib"]) == 3
    assert result["swap_latency"]["count"] == 3
    assert result["drained"] == 1 + 3
    assert result["retired_alive"] == []
    assert result["terminated_at_drain_timeout"] == 0
    assert set(result["rss_kib"]) == {"before", "after", "growth"}


def test_cluster() -> None:
    config = cluster.ClusterConfig(
        hosts=2, workers=1, deploys=2, load_deploys=2, rollbacks=1, rate=40, connections=1
    )
    result = anyio.run(cluster.run, config)
    for key in ("single_host_sqlite", "single_host_sqlite_all_workers", "cluster_postgresql"):
        assert result[key]["count"] == 2
        assert result[key]["p50_ms"] > 0
        assert "converge" in result[key]["steps_p50_ms"]
    assert result["ratio_cluster_to_sqlite"]["median"] > 0
    load = result["under_load"]
    assert load["rollbacks"] == 1
    assert load["deploys"]["count"] == 2 + 1  # the rollback is followed by the deploy again
    assert load["requests"] > 0
    assert load["failed"] == 0, load["errors"]
    assert "cluster_postgresql" in cluster.table(result)


def test_upgrade_analysis_and_plots(tmp_path: Path) -> None:
    """`analyse` on made-up observations: 1.0 answers until 0.1 s after the command, then 2.0;
    then the plots (if matplotlib is installed)."""
    t0 = 1000.0
    samples = [(t0 - 2 + i * 0.01, 0.001, 200, "1.0" if i < 210 else "2.0") for i in range(600)]
    observed = upgrade.Observed(
        command=UpgradeCommand(t0, t0 + 0.2, {"status": 201}),
        plain=PlainLoadResult(
            "httpx", samples, dict.fromkeys(("connect", "read", "write", "timeout", "status"), 0), 600
        ),
        probe=ProbeStats(),
        streams=StreamStats(),
        websockets=WebSocketStats(),
    )
    config = upgrade.UpgradeConfig(steady_s=2.0, after_s=4.0)
    method = HotDeploy(tmp_path, 1)
    try:
        result = upgrade.analyse(method, config, observed)
    finally:
        method.stop()
    assert result["time_to_first_new_s"] == pytest.approx(0.1, abs=0.011)
    assert result["time_to_all_new_s"] == pytest.approx(0.1, abs=0.011)
    assert result["converged"]
    assert result["latency"]["steady"]["count"] == 200
    assert result["latency"]["steady"]["p50_ms"] == 1.0
    assert result["upgrade_window_s"] == pytest.approx(0.7)

    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (benchmarks/requirements.txt)")
    from benchmarks import plots

    swaps = anyio.run(many_swaps.run, 2, 0)
    assert plots.plot_upgrade([result], tmp_path / "upgrade.png").stat().st_size > 0
    assert plots.plot_swaps(swaps, tmp_path / "swaps.png").stat().st_size > 0
