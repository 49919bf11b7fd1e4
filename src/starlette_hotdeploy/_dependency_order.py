"""Dependency order: items, each after the items it requires (a depth-first walk)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def requirements_first(
    items: Iterable[T], name: Callable[[T], str], requires: Callable[[T], Iterable[str]]
) -> list[T]:
    """`items` (by `name`), each after those of them that it `requires`; a requirement outside
    `items` is ignored, and a cycle (refused elsewhere) is cut where the walk meets it."""
    by_name = {name(item): item for item in items}
    ordered: list[T] = []
    seen: set[str] = set()

    def visit(item: T) -> None:
        if name(item) in seen:
            return
        seen.add(name(item))
        for other in requires(item):
            if other in by_name:
                visit(by_name[other])
        ordered.append(item)

    for item in by_name.values():
        visit(item)
    return ordered
