"""Markdown tables of the latest results, for docs/benchmarks.md.

.venv/bin/python -m benchmarks.report > /tmp/tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .common import RESULTS


def _load(name: str, directory: Path) -> dict[str, Any] | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def machine_table(machine: dict[str, Any]) -> str:
    versions = machine["versions"]
    rows = [
        ("CPU", f"{machine['cpu']}, {machine['cores']} cores"),
        ("memory", f"{machine['memory_gib']} GiB"),
        ("OS", machine["platform"]),
        ("Python", machine["python"]),
        (
            "uvicorn / gunicorn / uvicorn-worker",
            f"{versions['uvicorn']} / {versions['gunicorn']} / {versions['uvicorn-worker']}",
        ),
        (
            "starlette / uvloop / httptools",
            f"{versions['starlette']} / {versions['uvloop']} / {versions['httptools']}",
        ),
        ("load generator", machine["wrk"] or "built-in httpx clients (wrk missing)"),
    ]
    return "\n".join(["| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows]])


def upgrade_tables(document: dict[str, Any]) -> str:
    results = document["results"]
    head = (
        "| method | failed requests (wrk) | connection errors | websockets broken | streams cut / failed "
        "| command returned (s) | first answer from 2.0 (s) | all answers from 2.0 (s) |"
    )
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        errors = ", ".join(f"{k} {v}" for k, v in r["socket_errors"].items() if v)
        failed = f"{r['failed_requests']}" + (f" ({errors})" if errors else "")
        streams = r["streams"]
        ws = r["websockets"]
        codes = ", ".join(f"{k}: {v}" for k, v in ws["close_codes"].items())
        lines.append(
            f"| {r['label']} | {failed} | {r['connection_errors']} | {ws['broken']}"
            + (f" ({codes})" if codes else "")
            + f" of {ws['broken'] + ws['sessions']} | {streams['cut']} / {streams['failed']} of "
            f"{streams['completed'] + streams['cut'] + streams['failed']} "
            f"| {_num(r['command']['duration_s'])} | {_num(r['time_to_first_new_s'])} | {_num(r['time_to_all_new_s'])} |"
        )
    lines += [
        "",
        "| method | window (s) | p50 ms steady -> upgrade | p99 ms steady -> upgrade | max ms steady -> upgrade "
        "| req/s steady -> upgrade | longest gap ms steady -> upgrade | probe failed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        s, u = r["latency"]["steady"], r["latency"]["upgrade"]
        gap = r["max_gap_ms"]
        lines.append(
            f"| {r['label']} | {_num(r['upgrade_window_s'])} | {_num(s['p50_ms'])} -> {_num(u['p50_ms'])} "
            f"| {_num(s['p99_ms'])} -> {_num(u['p99_ms'])} | {_num(s['max_ms'])} -> {_num(u['max_ms'])} "
            f"| {_num(s['rps'], 5)} -> {_num(u['rps'], 5)} | {_num(gap['steady'])} -> {_num(gap['upgrade'])} "
            f"| {r['probe']['failed']} of {r['probe']['requests']} |"
        )
    return "\n".join(lines)


def _ratio(o: dict[str, Any]) -> str:
    r = o["rps_ratio"]
    return f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]"


def dispatch_tables(in_process: dict[str, Any] | None, uvicorn: dict[str, Any] | None) -> str:
    """One row per sub-app, request, dispatch and package count: the req/s ratio against the
    Mount of the same round (median [min-max] over the rounds), and latencies side by side."""
    header = [
        "| sub-app, request | packages | dispatch | req/s ratio to Mount, median [min-max] "
        "| p50 us (Mount) | p99 us (Mount) |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    names = {"middleware": "HotDeployMiddleware", "route": "HotDeployRoute"}
    lines = []
    for label, document in (
        ("In-process (a task per request, no sockets)", in_process),
        ("Through uvicorn", uvicorn),
    ):
        if document is None:
            continue
        config = document.get("config", {})
        rounds = config.get("rounds")
        lines += ["", f"{label}{f', {rounds} rounds' if rounds else ''}:", "", *header]
        for o in document["overheads"]:
            p50 = o.get("p50_us"), o.get("mount_p50_us")
            p99 = o.get("p99_us"), o.get("mount_p99_us")
            lines.append(
                f"| {o['app']} {o['call']} | {o['packages']} | {names.get(o['kind'], o['kind'])} | {_ratio(o)} "
                f"| {_num(p50[0])} ({_num(p50[1])}) | {_num(p99[0])} ({_num(p99[1])}) |"
            )
        host = next((r for r in document["results"] if r.get("kind") == "host"), None)
        if host is not None:
            lines += ["", f"A host route with {host['packages']} packages mounted: {host['mean_us']:.1f} us."]
    return "\n".join(lines).lstrip("\n")


def swaps_table(document: dict[str, Any]) -> str:
    r = document["result"]
    latency, switch, rss = r["swap_latency"], r["switch_point"], r["rss_kib"]
    rows = [
        ("swaps measured", f"{r['swaps']} (distinct versions; after {r['warmup_swaps']} warm-up swaps)"),
        (
            "deploy() call -> returned (switched)",
            f"p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms, max {latency['max_ms']:.1f} ms",
        ),
        (
            "deploy() call -> end of the switch step",
            f"p50 {switch['p50_ms']:.1f} ms, p99 {switch['p99_ms']:.1f} ms, max {switch['max_ms']:.1f} ms",
        ),
        (
            "RSS before -> after (gc, all drained)",
            f"{rss['before'] / 1024:.1f} MiB -> {rss['after'] / 1024:.1f} MiB: +{rss['growth'] / 1024:.2f} MiB",
        ),
        ("retired versions alive after the drains", str(len(r["retired_alive"]))),
        (
            "drained (hotdeploy_drained)",
            f"{r['drained']}, {r['terminated_at_drain_timeout']} ended at a drain timeout",
        ),
        ("sys.modules before -> after", f"{r['modules']['before']} -> {r['modules']['after']}"),
    ]
    return "\n".join(["| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows]])


def goals(
    upgrade: dict[str, Any] | None,
    in_process: dict[str, Any] | None,
    uvicorn: dict[str, Any] | None,
    swaps: dict[str, Any] | None,
) -> list[tuple[str, str, bool]]:
    """(goal, what was measured, met?) for each goal of the suite that has results."""
    rows: list[tuple[str, str, bool]] = []
    if upgrade is not None:
        by = {r["method"]: r for r in upgrade["results"]}
        hot = by.get("hotdeploy")
        if hot is not None:
            broken = hot["websockets"]["broken"] + hot["streams"]["cut"]
            rows.append(
                (
                    "(1) hot deployment: 0 failed requests, 0 broken websockets",
                    f"{hot['failed_requests']} failed requests, {hot['connection_errors']} connection errors, "
                    f"{hot['websockets']['broken']} websockets broken, {hot['streams']['cut']} streams cut, "
                    f"{hot['probe']['failed']} failed probes",
                    hot["failed_requests"] == 0 and broken == 0 and hot["probe"]["failed"] == 0,
                )
            )
            for other in ("uvicorn-hup", "gunicorn-hup"):
                if other not in by or hot["time_to_all_new_s"] is None:
                    continue
                theirs = by[other]["time_to_all_new_s"]
                ratio = theirs / hot["time_to_all_new_s"] if theirs else None
                rows.append(
                    (
                        f"(1) time to the new version >= 10x shorter than {by[other]['label']}",
                        f"all answers from 2.0 after {hot['time_to_all_new_s']:.3f} s against {_num(theirs)} s: "
                        f"{_num(ratio)}x (first answer from 2.0: {_num(hot['time_to_first_new_s'])} s against "
                        f"{_num(by[other]['time_to_first_new_s'])} s)",
                        ratio is not None and ratio >= 10,
                    )
                )
    for label, document in (("in-process", in_process), ("through uvicorn", uvicorn)):
        if document is None:
            continue
        middleware = [o for o in document["overheads"] if o["kind"] == "middleware"]
        headline = [o for o in middleware if o["packages"] == 1]
        for o in headline:
            rows.append(
                (
                    f"(14) {label}, {o['app']} {o['call']}: package req/s >= 0.98x a plain Mount, p99 no worse",
                    f"{_ratio(o)}; p99 {_num(o['p99_us'])} us against {_num(o['mount_p99_us'])} us",
                    o["rps_ratio"]["median"] >= 0.98 and o["p99_us"] <= o["mount_p99_us"],
                )
            )
        by_n = {o["packages"]: o for o in middleware if o["app"] == "tiny"}
        if len(by_n) > 1:
            most = by_n[max(by_n)]
            rows.append(
                (
                    f"(2) {label}: cost with {max(by_n)} packages at most 10% above the cost with one",
                    f"{most['vs_one_package_pct']:+.1f}%",
                    most["vs_one_package_pct"] <= 10,
                )
            )
    if swaps is not None:
        result = swaps["result"]
        growth_mb = result["rss_kib"]["growth"] * 1024 / 1e6
        rows.append(
            (
                f"(3) <= 10 MB RSS growth after {result['swaps']} swaps",
                f"{growth_mb:+.2f} MB ({result['rss_kib']['growth'] / 1024:+.2f} MiB)",
                growth_mb <= 10,
            )
        )
        rows.append(
            (
                "(3) 0 retired versions alive",
                str(len(result["retired_alive"])),
                not result["retired_alive"],
            )
        )
    return rows


def goals_table(rows: list[tuple[str, str, bool]]) -> str:
    lines = ["| goal | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {goal} | {measured} | {'yes' if met else '**no**'} |" for goal, measured, met in rows]
    return "\n".join(lines)


def main(directory: Path = RESULTS) -> int:
    upgrade = _load("upgrade", directory)
    in_process = _load("dispatch_overhead", directory)
    uvicorn = _load("dispatch_uvicorn", directory)
    swaps = _load("many_swaps", directory)
    for document in (upgrade, uvicorn, in_process, swaps):
        if document is not None and "machine" in document:
            print(machine_table(document["machine"]), end="\n\n")
            break
    if upgrade is not None:
        print(f"### Upgrade under load ({upgrade['measured_at']})\n\n{upgrade_tables(upgrade)}\n")
    if in_process is not None or uvicorn is not None:
        print(f"### Dispatch overhead\n\n{dispatch_tables(in_process, uvicorn)}\n")
    if swaps is not None:
        print(f"### Many swaps ({swaps['measured_at']})\n\n{swaps_table(swaps)}\n")
    print(f"### Goals\n\n{goals_table(goals(upgrade, in_process, uvicorn, swaps))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
