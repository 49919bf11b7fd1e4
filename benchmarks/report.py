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


def dispatch_tables(in_process: dict[str, Any] | None, uvicorn: dict[str, Any] | None) -> str:
    lines = []
    if in_process is not None:
        lines += [
            "In-process (ASGI calls, no sockets), mean per request:",
            "",
            "| packages | HotDeployMiddleware (us) | Starlette Mount (us) | middleware vs Mount | middleware vs its 1-package cost |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for o in in_process["overheads"]:
            lines.append(
                f"| {o['packages']} | {o['middleware_us']:.1f} | {o['mount_us']:.1f} "
                f"| {o['vs_mount_pct']:+.1f}% | {o['vs_one_package_pct']:+.1f}% |"
            )
        host = next((r for r in in_process["results"] if r["kind"] == "host"), None)
        if host is not None:
            lines += ["", f"A host route with {host['packages']} packages mounted: {host['mean_us']:.1f} us."]
    if uvicorn is not None:
        lines += [
            "",
            "Through uvicorn (one process, wrk, median of the rounds):",
            "",
            "| packages | HotDeployMiddleware req/s | Starlette Mount req/s | middleware cost per request vs Mount "
            "| middleware vs its 1-package cost | rounds (req/s), middleware / Mount |",
            "| ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        by = {(r["kind"], r["packages"]): r for r in uvicorn["results"]}
        for o in uvicorn["overheads"]:
            n = o["packages"]
            rounds = (
                f"{', '.join(f'{x:.0f}' for x in by[('middleware', n)]['rps_rounds'])} / "
                f"{', '.join(f'{x:.0f}' for x in by[('mount', n)]['rps_rounds'])}"
            )
            lines.append(
                f"| {n} | {o['middleware_rps']:.0f} | {o['mount_rps']:.0f} | {o['vs_mount_pct']:+.1f}% "
                f"| {o['vs_one_package_pct']:+.1f}% | {rounds} |"
            )
    return "\n".join(lines)


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
        rows_by_n = {o["packages"]: o for o in document["overheads"]}
        one, most = rows_by_n[min(rows_by_n)], rows_by_n[max(rows_by_n)]
        rows.append(
            (
                f"(2) {label}: <= 3% overhead against a plain Mount, one package",
                f"{one['vs_mount_pct']:+.1f}%",
                one["vs_mount_pct"] <= 3,
            )
        )
        rows.append(
            (
                f"(2) {label}: cost with {max(rows_by_n)} packages within 10% of the cost with one",
                f"{most['vs_one_package_pct']:+.1f}%",
                abs(most["vs_one_package_pct"]) <= 10,
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
