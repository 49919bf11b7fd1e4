"""RestoreOrder: a restore waits for the packages of its batch that it requires, gives its slot
back while it waits (a chain longer than the limiter does not stall), and never waits in a cycle."""

from __future__ import annotations

import anyio
import pytest
from packaging.specifiers import SpecifierSet

from starlette_hotdeploy._manifest import Manifest
from starlette_hotdeploy._restore_order import RestoreOrder

pytestmark = pytest.mark.anyio


def manifest(name: str, *requires: str) -> Manifest:
    return Manifest(
        name=name,
        version="1.0",
        app=f"{name}.app:app",
        mount=f"/{name}",
        requires={other: SpecifierSet(">=1") for other in requires},
    )


async def restore_all(order: RestoreOrder, manifests: list[Manifest]) -> list[str]:
    """What the follower does, without the packages: each restore in a task of its own, in the
    order given, holding a slot of the limiter; the order in which they load."""
    loaded: list[str] = []

    async def restore(m: Manifest) -> None:
        async with order.limiter:
            try:
                await order.before_load(m)
                loaded.append(m.name)
            finally:
                order.finished(m.name)

    with anyio.fail_after(10):  # a guard against a hang, not a wait
        async with anyio.create_task_group() as tasks:
            for m in manifests:
                tasks.start_soon(restore, m)
    return loaded


async def test_a_chain_longer_than_the_limiter_loads_in_dependency_order() -> None:
    chain = [manifest("d", "c"), manifest("c", "b"), manifest("b", "a"), manifest("a")]
    order = RestoreOrder([m.name for m in chain], concurrency=1)
    assert await restore_all(order, chain) == ["a", "b", "c", "d"]


async def test_a_cycle_in_the_store_does_not_stall_the_restore() -> None:
    cycle = [manifest("a", "b"), manifest("b", "a"), manifest("c", "a")]
    order = RestoreOrder([m.name for m in cycle], concurrency=2)
    loaded = await restore_all(order, cycle)
    assert sorted(loaded) == ["a", "b", "c"]
    assert loaded.index("c") > loaded.index("a")


async def test_requirements_outside_the_batch_are_not_waited_for() -> None:
    order = RestoreOrder(["orders"], concurrency=1)
    assert await restore_all(order, [manifest("orders", "inventory", "orders")]) == ["orders"]
