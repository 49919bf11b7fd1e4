"""Layers point down and no module of the package imports itself back (one concept a module)."""

from __future__ import annotations

import ast
from pathlib import Path

import starlette_hotdeploy

PACKAGE = Path(starlette_hotdeploy.__file__).parent

# Lower layers never import higher ones (DESIGN.md: request path <- engine <- coordination <- surfaces),
# under a base of shared vocabulary: types, errors, records, the manifest, the store's interface.
BASE = {
    "_types",
    "_errors",
    "_detail",
    "_deployment",
    "_events",
    "_manifest",
    "_operation",
    "_store",
    "_files",
    "_canary_plan",
    "_dependency_order",
    "_switch_interval",
    "_thread_hop",
}
REQUEST_PATH = {
    "_dispatch",
    "_scope",
    "_mounts",
    "_version",
    "_tasks",
    "_lifespan",
    "_loader",
    "_package_logging",
    "_figures",
    "_split",
}
ENGINE = {
    "_engine",
    "_package",
    "_probe",
    "_archive",
    "_hooks",
    "_cleaners",
    "_host_routes",
    "_signing",
    "_worker_figures",
    "_canary_analysis",
}
COORDINATION = {
    "_coordinator",
    "_follower",
    "_cluster",
    "_cluster_view",
    "_wakeup",
    "_notices",
    "_records",
    "_oplog",
    "_figures_share",
    "_requirements",
    "_restore_order",
    "_sql_store",
    "_sqlite_store",
    "_postgres_store",
    "_store_url",
    "_store_migrate",
    "_canary",
}
SURFACES = {
    "_deployer",
    "_admin",
    "_admin_events",
    "_ui",
    "_cli",
    "_client",
    "_serve",
    "_openapi",
    "_problems",
    "_watch",
    "_status",
    "_route",
    "_metrics",
    "testing",
}


def imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (module level, lazy and TYPE_CHECKING alike)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
        graph[name] = found - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for target in sorted(graph.get(node, ())):
            if target == "__init__":
                continue
            if target in path:
                found.append([*path[path.index(target) :], target])
            elif len(path) < len(graph):
                visit(target, [*path, target])

    for start in sorted(graph):
        if start != "__init__":
            visit(start, [start])
    return found


def test_no_import_cycle() -> None:
    assert cycles(imports()) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}})[0] == ["a", "b", "c", "a"]


def test_layers_point_down() -> None:
    graph = imports()
    layers = [BASE, REQUEST_PATH, ENGINE, COORDINATION, SURFACES]
    assert set().union(*layers) | {"__init__"} == set(graph)  # every module has its layer
    wrong = []
    for level, modules in enumerate(layers):
        above = set().union(*layers[level + 1 :])
        for module in sorted(modules):
            # The middleware builds the default Deployer and the admin app for its user: the one
            # sanctioned upward reference, made inside its constructor.
            allowed = {"_deployer", "_admin"} if module == "_dispatch" else set()
            wrong += [f"{module} -> {target}" for target in sorted(graph[module] & above - allowed)]
    assert wrong == []


def test_the_engine_never_imports_the_middleware() -> None:
    assert "_dispatch" not in imports()["_engine"]


def test_only_the_tasks_module_uses_asyncio() -> None:
    """anyio everywhere (asyncio and trio alike); _tasks is the one sanctioned exception."""
    users = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            if any(name == "asyncio" or name.startswith("asyncio.") for name in names):
                users.add(path.stem)
    assert users == {"_tasks"}
