"""Run the whole benchmark suite: set-up, every scenario, JSON results, tables and plots.

    .venv/bin/python -m benchmarks.run            # the full run (about 6-8 minutes on 2 cores)
    .venv/bin/python -m benchmarks.run --quick    # short phases, fewer rounds (about 2 minutes)

Options: `--only upgrade,dispatch,dispatch-uvicorn,swaps,soak,workers-switch,idle-cpu,restart-many`, `--workers N` (scenario 1),
`--no-wrk` (built-in httpx load), `--no-setup` (do not install anything).

Results go to benchmarks/results/<scenario>.json; the plots to docs/ (with `--quick`, to
benchmarks/results/, so that a quick run does not replace the documented ones).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

import anyio

from . import setup_env
from .common import RESULTS, ROOT, machine, write_results

# The scenario modules are imported in the functions below, after the set-up: they need the
# packages of benchmarks/requirements.txt (httpx-ws, matplotlib).

SCENARIOS = (
    "upgrade",
    "dispatch",
    "dispatch-uvicorn",
    "swaps",
    "soak",
    "workers-switch",
    "idle-cpu",
    "restart-many",
)


def run_upgrade(quick: bool, use_wrk: bool, workers: int) -> None:
    from . import servers, upgrade

    config = upgrade.config_for(quick, use_wrk, workers)
    results = anyio.run(upgrade.run, config, list(servers.METHODS))
    print(upgrade.table(results))
    write_results("upgrade", {"config": asdict(config), "machine": machine(), "results": results})


def run_dispatch(quick: bool) -> None:
    from . import dispatch_overhead

    requests, rounds = (4_000, 2) if quick else (20_000, 5)
    print("dispatch in-process ...", flush=True)
    results = anyio.run(dispatch_overhead.run, requests, dispatch_overhead.SCALES, rounds)
    print(dispatch_overhead.table(results))
    payload: dict[str, Any] = {"config": {"requests": requests, "rounds": rounds}, "results": results}
    payload["overheads"] = dispatch_overhead.overheads(results)
    write_results("dispatch_overhead", payload)


def run_dispatch_uvicorn(quick: bool, use_wrk: bool) -> None:
    from . import dispatch_uvicorn

    config = dispatch_uvicorn.config_for(quick, use_wrk)
    results = dispatch_uvicorn.run(config)
    print(dispatch_uvicorn.table(results))
    payload = {
        "config": asdict(config),
        "results": results,
        "overheads": dispatch_uvicorn.overheads(results),
        "metrics_cost": dispatch_uvicorn.metrics_cost(results),
    }
    write_results("dispatch_uvicorn", payload)


def run_swaps() -> None:
    """In a process of its own, so that its memory numbers start from a fresh interpreter."""
    print("200 swaps in a row ...", flush=True)
    subprocess.run([sys.executable, "-m", "benchmarks.many_swaps", "--swaps", "200"], cwd=ROOT, check=True)


def run_soak(quick: bool) -> None:
    """Swaps and rollbacks under traffic on 1, then 2 workers (benchmarks/soak.py)."""
    from . import soak

    swaps = 40 if quick else 200
    results = anyio.run(
        soak.run_all, soak.SoakConfig(swaps=swaps), [1, 2], lambda line: print(line, flush=True)
    )
    write_results("soak", {"results": results})


def run_module(module: str, *args: str) -> None:
    """A scenario in a process of its own (it starts and times its own servers)."""
    subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, check=True)


def busy_note() -> None:
    """Warn when something else keeps the machine busy: the numbers would be noisy."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"NOTE: load average {load:.2f} before this scenario: other processes compete for the CPUs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short phases and fewer rounds")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--workers", type=int, default=2, help="worker processes in scenario 1")
    parser.add_argument("--no-wrk", action="store_true", help="built-in httpx load instead of wrk")
    parser.add_argument("--no-setup", action="store_true", help="install nothing")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")

    setup = setup_env.ensure(install=not args.no_setup)
    for note in setup.notes:
        print(f"set-up: {note}")
    if not setup.python_ok:
        print("set-up failed: run `.venv/bin/pip install -r benchmarks/requirements.txt`", file=sys.stderr)
        return 1
    use_wrk = setup.wrk and not args.no_wrk
    if not use_wrk:
        print("NOTE: plain-request load uses the built-in httpx clients, not wrk", flush=True)

    started = time.monotonic()
    if "upgrade" in chosen:
        busy_note()
        run_upgrade(args.quick, use_wrk, args.workers)
    if "dispatch" in chosen:
        busy_note()
        run_dispatch(args.quick)
    if "dispatch-uvicorn" in chosen:
        busy_note()
        run_dispatch_uvicorn(args.quick, use_wrk)
    if "swaps" in chosen:
        busy_note()
        run_swaps()
    if "soak" in chosen:
        busy_note()
        run_soak(args.quick)
    if "workers-switch" in chosen:
        busy_note()
        run_module("workers_switch", "--deploys", "10" if args.quick else "30")
    if "idle-cpu" in chosen:
        busy_note()
        run_module("idle_cpu", "--seconds", "5" if args.quick else "20")
    if "restart-many" in chosen:
        busy_note()
        run_module("restart_many", "--starts", "2" if args.quick else "4")

    from . import plots  # matplotlib is imported only now, after the set-up installed it

    for path in plots.draw(RESULTS, RESULTS if args.quick else ROOT / "docs"):
        print(f"plot: {path}")
    print(f"done in {time.monotonic() - started:.0f} s; results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
