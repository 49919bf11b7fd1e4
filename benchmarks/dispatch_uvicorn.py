"""Dispatch overhead through a real server: wrk against one uvicorn process that serves the same
sub-app (i) under a plain Starlette `Mount`, (ii) as a package behind HotDeployMiddleware,
(iii) as a package behind HotDeployRoute in the host's routes and (iv) behind HotDeployMiddleware
with metrics off (`Deployer(metrics=False)`): the cost of counting requests is (ii) against (iv).

    .venv/bin/python -m benchmarks.dispatch_uvicorn [--quick] [--apps fastapi,tiny]
        [--scales 1,10,100,1000] [--rounds 6] [--seconds 5] [--no-wrk] [--kinds mount,middleware,...]

Sub-apps (benchmarks/dispatch_apps.py): `fastapi`, a FastAPI app with pydantic models (`GET
/items/{id}` with a response model, `POST /items` with a validated JSON body), with one package:
the headline; and `tiny`, a one-route Starlette app, with 1, 10, 100 and 1000 packages, the
request going to the last one (a Starlette router tries its routes in order). The Mount imports
the package's module the ordinary way from the same files that the deployer loads.

uvicorn runs as users run it: one worker, `--no-access-log`, `--loop`/`--http` left at `auto`
(uvloop and httptools when installed, as with `uvicorn[standard]`; the server reports what it
runs, and the results record it). Each round starts a fresh server for each of the three
hosts in turn (four), the order rotated from one round to the next (A B C, B C A, C A B, ...), warms it
up, runs wrk on each request for `seconds`, and stops it, so that only the measured server is on
its core and a round's three measurements are close in time. Where `taskset` exists the server
runs on CPU 0 and wrk on CPU 1. The packages are deployed beforehand into a home (this process),
which a fresh copy of is restored by each hot-deployment server at start-up.

Reported for each comparison: the req/s ratio (package / Mount) of each round, as median and
min-max over the rounds, and wrk's p50/p99 latency (median over the rounds) side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from starlette_hotdeploy import Deployer

from .common import (
    BENCHMARKS,
    BenchmarkError,
    ServerProcess,
    against_mount,
    free_port,
    machine,
    spread,
    wait_until,
    write_results,
)
from .dispatch_apps import (
    ALL_KINDS,
    APP_ENV,
    CALLS,
    CANARY_COOKIE,
    HOME_ENV,
    KINDS,
    LABELS,
    PACKAGES_ENV,
    SOURCES_ENV,
    Call,
    package_names,
    write_package,
)
from .servers import uvicorn_command

SUMMARY_SCRIPT = BENCHMARKS / "summary.lua"
FACTORIES = {
    "mount": "create_mount_app",
    "middleware": "create_middleware_app",
    "route": "create_route_app",
    "nometrics": "create_nometrics_app",
    "canary": "create_canary_app",
}


@dataclass
class DispatchConfig:
    scales: tuple[int, ...] = (1, 10, 100, 1000)  # package counts of the tiny app
    apps: tuple[str, ...] = ("fastapi", "tiny")  # fastapi: one package
    rounds: int = 6  # with one package
    seconds: float = 5.0  # per wrk run, with one package
    scale_rounds: int = 3  # with more packages
    scale_seconds: float = 3.0
    warmup_s: float = 1.0  # per request kind, on each fresh server
    connections: int = 16
    use_wrk: bool = True
    kinds: tuple[str, ...] = KINDS  # the hosts compared; the Mount is always measured
    pinning: list[str] = field(default_factory=list)  # filled in by run()
    uvicorn: dict[str, Any] = field(default_factory=dict)  # loop/http the servers reported


def pinning() -> tuple[list[str], list[str]]:
    """taskset prefixes for the server (CPU 0) and the load generator (CPU 1), if possible."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", "0"], ["taskset", "-c", "1"]
    return [], []


async def populate_home(home: Path, sources: Path, app: str, count: int) -> None:
    """Deploy `count` packages of sub-app `app` into `home` (then stop): the servers restore them."""
    deployer = Deployer(home=home, entry_points=False)
    async with deployer.running():
        for name in package_names(count, app):
            await deployer.deploy(write_package(sources, name, app))


@dataclass
class Scenario:
    app: str
    packages: int
    rounds: int
    seconds: float

    @property
    def calls(self) -> tuple[Call, ...]:
        return CALLS[self.app]

    @property
    def target(self) -> str:
        return package_names(self.packages, self.app)[-1]


def scenarios(config: DispatchConfig) -> list[Scenario]:
    found = []
    if "fastapi" in config.apps:
        found.append(Scenario("fastapi", 1, config.rounds, config.seconds))
    if "tiny" in config.apps:
        for n in config.scales:
            rounds, seconds = (
                (config.rounds, config.seconds) if n == 1 else (config.scale_rounds, config.scale_seconds)
            )
            found.append(Scenario("tiny", n, rounds, seconds))
    return found


class Server:
    """One uvicorn process serving `kind`'s host app for a scenario."""

    def __init__(self, kind: str, scenario: Scenario, workdir: Path, prefix: list[str], index: int) -> None:
        self.kind = kind
        self.port = free_port()
        home = workdir / f"home-{scenario.app}-{scenario.packages}"
        env = {
            APP_ENV: scenario.app,
            PACKAGES_ENV: str(scenario.packages),
            SOURCES_ENV: str(workdir / "sources"),
        }
        if kind != "mount":  # a fresh copy of the populated home: no state from the run before
            copy = workdir / f"run-{index}-{kind}"
            shutil.copytree(home, copy)
            env[HOME_ENV] = str(copy)
            self.home: Path | None = copy
        else:
            self.home = None
        command = prefix + uvicorn_command(f"benchmarks.dispatch_apps:{FACTORIES[kind]}", self.port, None)
        self.process = ServerProcess(
            command, workdir / f"{scenario.app}-{scenario.packages}-{kind}.log", env=env
        )
        self.process.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, scenario: Scenario) -> None:
        call = scenario.calls[0]
        url = self.url(f"/{scenario.target}{call.path}")

        def ready() -> bool | None:
            if not self.process.alive():
                raise BenchmarkError(f"the {self.kind} server exited:\n{self.process.log_tail()}")
            try:
                response = httpx.request(call.method, url, content=call.body or None, timeout=2)
            except httpx.HTTPError:
                return None
            return True if response.status_code == call.status else None

        wait_until(f"{url} to answer", ready, timeout=300, interval=0.1)
        if self.kind == "canary":
            response = httpx.post(self.url("/_bench/canary"), timeout=120)
            if response.status_code != 202:
                raise BenchmarkError(
                    f"the canary did not start: {response.status_code} {response.text[:500]}"
                )

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = httpx.get(self.url("/_bench"), timeout=5).json()
        return info

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down, the deployer stops its packages), SIGKILL after 10 s."""
        if self.process.alive():
            self.process.signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        self.process.kill()
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)


def wrk_script(call: Call, workdir: Path, cookie: str | None = None) -> Path:
    """summary.lua for a plain GET; for a request with a body or a cookie, a script that sets
    the method, headers and body (as globals: wrk keeps its fast path) and then loads summary.lua."""
    if not call.body and cookie is None:
        return SUMMARY_SCRIPT
    script = workdir / f"wrk-{call.method.lower()}{'-cookie' if cookie else ''}.lua"
    lines = [f"wrk.method = {json.dumps(call.method)}"]
    if call.body:
        lines += [
            f"wrk.body = {json.dumps(call.body.decode())}",
            'wrk.headers["Content-Type"] = "application/json"',
        ]
    if cookie is not None:
        lines.append(f'wrk.headers["Cookie"] = {json.dumps(cookie)}')
    lines.append(f"dofile({json.dumps(str(SUMMARY_SCRIPT))})")
    script.write_text("\n".join(lines) + "\n")
    return script


def wrk_run(
    url: str, call: Call, config: DispatchConfig, seconds: float, prefix: list[str], workdir: Path
) -> dict[str, Any]:
    """One wrk run: requests per second and latency percentiles (microseconds)."""
    command = [*prefix, "wrk", "-t1", f"-c{config.connections}", f"-d{max(1, round(seconds))}s"]
    cookie = CANARY_COOKIE if "canary" in config.kinds else None
    command += ["-s", str(wrk_script(call, workdir, cookie)), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_SUMMARY ")), None)
    if line is None:
        raise BenchmarkError(f"wrk printed no summary: {done.stdout[-1000:]} {done.stderr[-1000:]}")
    summary: dict[str, Any] = json.loads(line.removeprefix("WRK_SUMMARY "))
    errors = sum(summary[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "rps": summary["requests"] / (summary["duration_us"] / 1e6),
        "mean_us": summary["mean_us"],
        "p50_us": summary["p50_us"],
        "p99_us": summary["p99_us"],
        "errors": errors,
    }


def httpx_run(url: str, call: Call, config: DispatchConfig, seconds: float) -> dict[str, Any]:
    """The fallback without wrk: `connections` async httpx clients for `seconds` (this measures
    the Python client as much as the server; only for the smoke test and machines without wrk)."""

    async def load() -> tuple[list[float], int]:
        latencies: list[float] = []
        errors = 0
        deadline = time.monotonic() + seconds
        headers = {"Content-Type": "application/json"} if call.body else {}
        if "canary" in config.kinds:
            headers["Cookie"] = CANARY_COOKIE

        async def client() -> None:
            nonlocal errors
            async with httpx.AsyncClient(timeout=10) as http:
                # The deadline is checked after each request, so every client measures at least
                # one even when a slow machine's first request outlasts a short warm-up.
                for _ in range(1_000_000):
                    started = time.perf_counter()
                    response = await http.request(
                        call.method, url, content=call.body or None, headers=headers
                    )
                    latencies.append(time.perf_counter() - started)
                    errors += response.status_code != call.status
                    if time.monotonic() >= deadline:
                        return

        async with anyio.create_task_group() as tg:
            for _ in range(config.connections):
                tg.start_soon(client)
        return sorted(latencies), errors

    started = time.monotonic()
    latencies, errors = anyio.run(load)
    elapsed = time.monotonic() - started
    return {
        "rps": len(latencies) / max(elapsed, seconds),
        "mean_us": statistics.fmean(latencies) * 1e6,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "errors": errors,
    }


def rotated(kinds: tuple[str, ...], round_index: int) -> list[str]:
    shift = round_index % len(kinds)
    return [*kinds[shift:], *kinds[:shift]]


def measure_scenario(scenario: Scenario, config: DispatchConfig, workdir: Path) -> list[dict[str, Any]]:
    """`scenario.rounds` rounds, each a fresh server per kind in rotated order, every request
    measured on each."""
    anyio.run(
        populate_home,
        workdir / f"home-{scenario.app}-{scenario.packages}",
        workdir / "sources",
        scenario.app,
        scenario.packages,
    )
    server_prefix, load_prefix = pinning()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {
        (call.name, kind): [] for call in scenario.calls for kind in config.kinds
    }

    def load(url: str, call: Call, seconds: float) -> dict[str, Any]:
        if config.use_wrk:
            return wrk_run(url, call, config, seconds, load_prefix, workdir)
        return httpx_run(url, call, config, seconds)

    for r in range(scenario.rounds):
        for kind in rotated(config.kinds, r):
            server = Server(kind, scenario, workdir, server_prefix, r)
            try:
                server.wait_ready(scenario)
                if not config.uvicorn.get(kind):
                    config.uvicorn[kind] = server.info()
                for call in scenario.calls:
                    load(server.url(f"/{scenario.target}{call.path}"), call, config.warmup_s)
                for call in scenario.calls:
                    result = load(server.url(f"/{scenario.target}{call.path}"), call, scenario.seconds)
                    runs[(call.name, kind)].append({"round": r, **result})
            finally:
                server.stop()
    return [summarise(scenario, call_name, kind, kind_runs) for (call_name, kind), kind_runs in runs.items()]


def summarise(scenario: Scenario, call: str, kind: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds (req/s, p50, p99), the spread, and every round."""
    rps = [r["rps"] for r in runs]
    median_rps = statistics.median(rps)
    return {
        "app": scenario.app,
        "call": call,
        "kind": kind,
        "packages": scenario.packages,
        "rps": round(median_rps, 1),
        "rps_min": round(min(rps), 1),
        "rps_max": round(max(rps), 1),
        "rps_rounds": [round(x, 1) for x in rps],
        "us_per_request": round(1e6 / median_rps, 2),
        "mean_us": round(statistics.median(r["mean_us"] for r in runs), 1),
        "p50_us": statistics.median(r["p50_us"] for r in runs),
        "p99_us": statistics.median(r["p99_us"] for r in runs),
        "p99_us_rounds": [r["p99_us"] for r in runs],
        "p50_us_rounds": [r["p50_us"] for r in runs],
        "errors": sum(r["errors"] for r in runs),
    }


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def overheads(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each sub-app, request and package count: HotDeployMiddleware and HotDeployRoute
    against the Mount. `rps_ratio`: package req/s over Mount req/s in the same round, median,
    min-max and quartiles over the rounds; p50/p99 side by side (medians over the rounds);
    `vs_one_package_pct`: the package's time per request against its own with the fewest
    packages; `target_met`: ratio median >= 0.98 and p99 no worse than the Mount's."""
    rows = []
    for pair in against_mount(results):
        app, call, kind, n, r, mount = pair.app, pair.call, pair.kind, pair.packages, pair.result, pair.mount
        base = pair.fewest["us_per_request"]
        ratios = [h / m for h, m in zip(r["rps_rounds"], mount["rps_rounds"], strict=True)]
        q1, q3 = quartiles(ratios)
        median = statistics.median(ratios)
        rows.append(
            {
                "app": app,
                "call": call,
                "kind": kind,
                "packages": n,
                "rps": r["rps"],
                "mount_rps": mount["rps"],
                "rps_ratio": {
                    "median": round(median, 4),
                    "min": round(min(ratios), 4),
                    "max": round(max(ratios), 4),
                    "q1": round(q1, 4),
                    "q3": round(q3, 4),
                    "rounds": [round(x, 4) for x in ratios],
                },
                "p50_us": r["p50_us"],
                "mount_p50_us": mount["p50_us"],
                "p99_us": r["p99_us"],
                "mount_p99_us": mount["p99_us"],
                "vs_mount_pct": round((r["us_per_request"] / mount["us_per_request"] - 1) * 100, 1),
                "vs_one_package_pct": round((r["us_per_request"] / base - 1) * 100, 1),
                "target_met": median >= 0.98 and r["p99_us"] <= mount["p99_us"],
            }
        )
    return rows


def metrics_cost(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each sub-app, request and package count: HotDeployMiddleware with metrics on against
    the same with metrics off, req/s ratio per round (median, min-max), p50/p99 side by side."""
    rows = []
    for on, off, row in _paired(results, "middleware", "nometrics"):
        rows.append(
            {
                **row,
                "p50_us": on["p50_us"],
                "off_p50_us": off["p50_us"],
                "p99_us": on["p99_us"],
                "off_p99_us": off["p99_us"],
                "target_met": row["rps_ratio"]["median"] >= 0.98,
            }
        )
    return rows


def canary_cost(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each sub-app, request and package count: HotDeployMiddleware with a canary of the
    target package (50%, sticky by cookie) against the same without one: the cost of canary
    routing, as a req/s ratio per round (median, min-max), p50/p99 side by side."""
    rows = []
    for canary, plain, row in _paired(results, "canary", "middleware"):
        rows.append(
            {
                **row,
                "us_per_request_added": round(canary["us_per_request"] - plain["us_per_request"], 2),
                "p50_us": canary["p50_us"],
                "plain_p50_us": plain["p50_us"],
                "p99_us": canary["p99_us"],
                "plain_p99_us": plain["p99_us"],
            }
        )
    return rows


def _paired(
    results: list[dict[str, Any]], kind: str, against: str
) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """Each `kind` result with the `against` one of the same sub-app, request and package count,
    and their req/s ratio per round (median, min-max) and cost."""
    by = {(r["app"], r["call"], r["kind"], r["packages"]): r for r in results}
    found = []
    for (app, call, this, n), one in by.items():
        other = by.get((app, call, against, n))
        if this != kind or other is None:
            continue
        ratios = [a / b for a, b in zip(one["rps_rounds"], other["rps_rounds"], strict=True)]
        median = statistics.median(ratios)
        row = {
            "app": app,
            "call": call,
            "packages": n,
            "rps_ratio": {
                "median": round(median, 4),
                "min": round(min(ratios), 4),
                "max": round(max(ratios), 4),
                "rounds": [round(x, 4) for x in ratios],
            },
            "cost_pct": round((1 / median - 1) * 100, 2),
        }
        found.append((one, other, row))
    return found


def run(config: DispatchConfig) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    config.pinning = [" ".join(p) or "none" for p in pinning()]
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        for scenario in scenarios(config):
            print(
                f"dispatch through uvicorn: {scenario.app}, {scenario.packages} package(s), "
                f"{scenario.rounds} rounds ...",
                flush=True,
            )
            results += measure_scenario(scenario, config, Path(tmp))
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'sub-app, request':26} {'pkgs':>5} {'server':20} {'req/s':>8} {'min-max':>13} "
        f"{'p50 us':>7} {'p99 us':>7} {'errors':>6}"
    ]
    for r in results:
        lines.append(
            f"{r['app'] + ' ' + r['call']:26} {r['packages']:>5} {LABELS[r['kind']]:20} {r['rps']:>8.0f} "
            f"{r['rps_min']:>6.0f}-{r['rps_max']:<6.0f} {r['p50_us']:>7.0f} {r['p99_us']:>7.0f} {r['errors']:>6}"
        )
    lines += [
        "",
        f"{'sub-app, request':26} {'pkgs':>5} {'vs Mount':20} {'req/s ratio med [min-max]':>26} "
        f"{'p50 us / Mount':>15} {'p99 us / Mount':>15} {'vs 1 pkg':>9} target",
    ]
    for o in overheads(results):
        ratio = o["rps_ratio"]
        lines.append(
            f"{o['app'] + ' ' + o['call']:26} {o['packages']:>5} {LABELS[o['kind']]:20} "
            f"{spread(ratio)} "
            f"{o['p50_us']:>7.0f}/{o['mount_p50_us']:<7.0f} {o['p99_us']:>7.0f}/{o['mount_p99_us']:<7.0f} "
            f"{o['vs_one_package_pct']:>+8.1f}% {'met' if o['target_met'] else 'NOT met'}"
        )
    lines += [
        "",
        f"{'sub-app, request':26} {'pkgs':>5} {'metrics on / off':20} {'req/s ratio med [min-max]':>26} "
        f"{'p50 us on/off':>15} {'p99 us on/off':>15} {'cost':>9} target (<2%)",
    ]
    for m in metrics_cost(results):
        ratio = m["rps_ratio"]
        lines.append(
            f"{m['app'] + ' ' + m['call']:26} {m['packages']:>5} {'':20} "
            f"{spread(ratio)} "
            f"{m['p50_us']:>7.0f}/{m['off_p50_us']:<7.0f} {m['p99_us']:>7.0f}/{m['off_p99_us']:<7.0f} "
            f"{m['cost_pct']:>+8.1f}% {'met' if m['target_met'] else 'NOT met'}"
        )
    canaries = canary_cost(results)
    if canaries:
        lines += [
            "",
            f"{'sub-app, request':26} {'pkgs':>5} {'canary / plain':20} {'req/s ratio med [min-max]':>26} "
            f"{'p50 us can/plain':>17} {'p99 us can/plain':>17} {'cost':>8} {'us/req':>7}",
        ]
        for c in canaries:
            lines.append(
                f"{c['app'] + ' ' + c['call']:26} {c['packages']:>5} {'':20} "
                f"{spread(c['rps_ratio'])} "
                f"{c['p50_us']:>8.0f}/{c['plain_p50_us']:<8.0f} {c['p99_us']:>8.0f}/{c['plain_p99_us']:<8.0f} "
                f"{c['cost_pct']:>+7.1f}% {c['us_per_request_added']:>+7.2f}"
            )
    return "\n".join(lines)


def config_for(quick: bool, use_wrk: bool) -> DispatchConfig:
    if quick:
        return DispatchConfig(
            rounds=3, seconds=2, scale_rounds=1, scale_seconds=2, warmup_s=0.5, use_wrk=use_wrk
        )
    return DispatchConfig(use_wrk=use_wrk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--apps", default="fastapi,tiny")
    parser.add_argument("--scales", default="1,10,100,1000", help="package counts of the tiny app")
    parser.add_argument("--rounds", type=int, help="rounds with one package")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run with one package")
    parser.add_argument("--no-wrk", action="store_true")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"hosts to compare, of {','.join(ALL_KINDS)}"
    )
    parser.add_argument("--name", default="dispatch_uvicorn", help="results file name (no .json)")
    args = parser.parse_args(argv)
    config = config_for(args.quick, not args.no_wrk and shutil.which("wrk") is not None)
    config.scales = tuple(int(n) for n in args.scales.split(","))
    config.apps = tuple(a for a in args.apps.split(",") if a)
    config.kinds = tuple(dict.fromkeys(["mount", *(k for k in args.kinds.split(",") if k in ALL_KINDS)]))
    if args.rounds:
        config.rounds = args.rounds
    if args.seconds:
        config.seconds = args.seconds
    results = run(config)
    print(table(results))
    payload = {
        "config": asdict(config),
        "machine": machine(),
        "results": results,
        "overheads": overheads(results),
        "metrics_cost": metrics_cost(results),
        "canary_cost": canary_cost(results),
    }
    print(f"written: {write_results(args.name, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
