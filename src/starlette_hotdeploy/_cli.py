"""The `hotdeploy` command (placeholder until the CLI lands)."""

from __future__ import annotations


def main() -> None:
    raise SystemExit("hotdeploy: the command line is not built yet")
