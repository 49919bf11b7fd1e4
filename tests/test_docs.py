"""The docs stay true to the code: every Python block of the README and of the docs site parses,
the README's and the getting-started guide's blocks run as written, every page is in the site's
navigation, and every admin API path the docs name exists."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import httpx
import pytest

from starlette_hotdeploy import Deployer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in PYTHON_BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return found


BLOCKS = python_blocks()


def test_the_docs_have_python_blocks() -> None:
    assert len(BLOCKS) > 20


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_every_python_block_compiles(where: str, code: str) -> None:
    """`await` at the top level is allowed: the blocks show calls made from async code."""
    compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


def test_every_page_is_in_the_sites_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*([\w-]+\.md)\s*$", nav, re.MULTILINE))
    assert listed == {page.name for page in (ROOT / "docs").glob("*.md")}


def test_every_admin_path_the_docs_describe_is_served() -> None:
    """The `### \\`GET /path\\`` headings of the admin API page against the OpenAPI document."""
    from starlette_hotdeploy._openapi import openapi_document

    served = {path.removeprefix("/_hotdeploy") for path in openapi_document("/_hotdeploy", 1)["paths"]}
    text = (ROOT / "docs" / "admin-api.md").read_text()
    described = set(re.findall(r"^### `(?:GET|POST|DELETE) ([^`? ]+)", text, re.MULTILINE))
    assert described, "no endpoint headings found"
    assert described <= served, described - served


# -- the front page and the getting-started guide run as written -------------------------------

ORDERS_APP = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

async def index(request):
    return JSONResponse({"version": "{version}"})

async def health(request):
    return PlainTextResponse("ok")

app = Starlette(routes=[Route("/", index), Route("/health", health)])
"""


def page_blocks(page: str, language: str) -> list[str]:
    fence = re.compile(rf"^```{language}\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return [match.group(1) for match in fence.finditer((ROOT / page).read_text())]


def write_orders(manifest: str, version: str) -> None:
    """The package of the guide's layout and manifest, at `version`."""
    package = Path(f"orders-{version}") / "orders"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "app.py").write_text(ORDERS_APP.replace("{version}", version))
    (package.parent / "hotdeploy.toml").write_text(
        manifest.replace('version = "1.0"', f'version = "{version}"')
    )


async def run_block(code: str, namespace: dict[str, object], where: str) -> None:
    compiled = compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    result = eval(compiled, namespace)  # a coroutine when the block awaits
    if inspect.iscoroutine(result):
        await result


@pytest.mark.anyio
@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
async def test_the_add_the_middleware_block_builds_a_host_that_serves_packages(
    page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOTDEPLOY_ADMIN_TOKEN", "guide-token")
    namespace: dict[str, object] = {}
    await run_block(page_blocks(page, "python")[0], namespace, page)
    deployer, app = namespace["deployer"], namespace["app"]
    assert isinstance(deployer, Deployer)
    write_orders(page_blocks("docs/getting-started.md", "toml")[0], "1.0")
    async with deployer.running():
        await deployer.deploy("orders-1.0")
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/orders/")).json() == {"version": "1.0"}
            admin = await client.get("/_hotdeploy/packages", headers={"Authorization": "Bearer guide-token"})
    assert [p["name"] for p in admin.json()["packages"]] == ["orders"]
    assert (tmp_path / ".hotdeploy" / "archives" / "orders").is_dir()


@pytest.mark.anyio
async def test_the_getting_started_guide_runs_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its middleware block, its packages (the layout and manifest it shows), the deploy of 1.0
    that its shell block makes, then its Python operations."""
    monkeypatch.chdir(tmp_path)
    setup, operations = page_blocks("docs/getting-started.md", "python")
    namespace: dict[str, object] = {}
    await run_block(setup, namespace, "getting-started: add the middleware")
    deployer = namespace["deployer"]
    assert isinstance(deployer, Deployer)
    manifest = page_blocks("docs/getting-started.md", "toml")[0]
    write_orders(manifest, "1.0")
    write_orders(manifest, "2.0")
    async with deployer.running():
        await deployer.deploy("orders-1.0")  # `hotdeploy deploy orders-1.0/`
        await run_block(operations, namespace, "getting-started: from Python")
        history = [(r.operation.value, r.to_version, r.outcome.value) for r in deployer.history]
    assert history == [
        ("deploy", "1.0", "succeeded"),
        ("deploy", "2.0", "succeeded"),
        ("rollback", "1.0", "succeeded"),
        ("activate", "2.0", "succeeded"),
        ("undeploy", None, "succeeded"),
    ]
    statuses = namespace["statuses"]
    assert isinstance(statuses, list)
    assert [(s.name, s.active_version) for s in statuses] == [("orders", "2.0")]
