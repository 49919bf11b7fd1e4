"""The plots of docs/benchmarks.md, drawn from the results JSON files.

    .venv/bin/python -m benchmarks.plots [--out docs]

- `benchmark-upgrade.png`: latency of the plain requests around the upgrade command, per method
  (p50 and max per 100 ms), the share of answers from 2.0, and failed requests.
- `benchmark-swaps.png`: the swap latency histogram and resident memory over 200 swaps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib  # type: ignore[import-untyped, import-not-found, unused-ignore]

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # type: ignore[import-untyped, import-not-found, unused-ignore]

from .common import RESULTS, ROOT


def plot_upgrade(results: list[dict[str, Any]], path: Path) -> Path:
    """One panel per method: latency over time across the upgrade."""
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.6 * len(results)), sharex=True, squeeze=False)
    for ax, result in zip(axes[:, 0], results, strict=True):
        line = result["timeline"]
        t = line["t_s"]
        ax.plot(t, line["max_ms"], color="tab:orange", linewidth=0.8, label="max")
        ax.plot(t, line["p50_ms"], color="tab:blue", linewidth=1.0, label="p50")
        ax.set_yscale("log")
        ax.set_ylabel("latency ms")
        failed = [(x, n) for x, n in zip(t, line["failed"], strict=True) if n]
        if failed:
            ax.scatter(
                [x for x, _ in failed],
                [1000.0] * len(failed),
                marker="x",
                color="red",
                s=12,
                label="failed (probe/httpx)",
            )
        ax.axvline(0, color="black", linewidth=0.8)
        if result["time_to_all_new_s"] is not None:
            ax.axvline(result["time_to_all_new_s"], color="green", linestyle="--", linewidth=0.8)
        share = ax.twinx()
        share.step(
            t,
            [s if s is not None else float("nan") for s in line["new_share"]],
            where="post",
            color="green",
            linewidth=0.8,
            alpha=0.6,
        )
        share.set_ylim(-0.05, 1.05)
        share.set_ylabel("share 2.0", color="green")
        errors = result["failed_requests"]
        ax.set_title(
            f"{result['label']}: {errors} failed requests, {result['websockets']['broken']} websockets broken, "
            f"all answers from 2.0 after {result['time_to_all_new_s']} s",
            fontsize=9,
        )
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel(
        "seconds from the upgrade command (black line); green dashes: last answer from 1.0"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_swaps(result: dict[str, Any], path: Path) -> Path:
    """Swap latency histogram and RSS after each swap."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    left.hist(result["swap_latencies_ms"], bins=40, color="tab:blue")
    latency = result["swap_latency"]
    left.set_title(
        f"swap latency: p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms", fontsize=9
    )
    left.set_xlabel("deploy() call to switched, ms")
    left.set_ylabel("swaps")
    curve = [kib / 1024 for kib in result["rss_curve_kib"]]
    right.plot(range(1, len(curve) + 1), curve, color="tab:orange")
    rss = result["rss_kib"]
    right.axhline(rss["before"] / 1024, color="grey", linestyle="--", linewidth=0.8)
    right.set_title(
        f"RSS: {rss['before'] / 1024:.1f} -> {rss['after'] / 1024:.1f} MiB after drains and gc; "
        f"{len(result['retired_alive'])} retired alive",
        fontsize=9,
    )
    right.set_xlabel("swap")
    right.set_ylabel("RSS MiB (no gc)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(results_dir: Path, out: Path) -> list[Path]:
    """Draw what the results directory has data for."""
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    upgrade = results_dir / "upgrade.json"
    if upgrade.exists():
        drawn.append(plot_upgrade(json.loads(upgrade.read_text())["results"], out / "benchmark-upgrade.png"))
    swaps = results_dir / "many_swaps.json"
    if swaps.exists():
        drawn.append(plot_swaps(json.loads(swaps.read_text())["result"], out / "benchmark-swaps.png"))
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    for path in draw(args.results, args.out):
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
