"""The docs stay true to the code: every Python block of the README and of the docs site parses,
every page is in the site's navigation, and every admin API path the docs name exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

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
