"""Keeps the public API honest: what `starlette_hotdeploy` exports resolves and is documented,
nothing private leaks, what the docs import is exported, and the Python admin client works as
the README shows it."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import starlette_hotdeploy
from starlette_hotdeploy import (
    AdminClient,
    AdminProblem,
    AdminUnreachable,
    DeploymentTimeout,
    HotDeployError,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXPORTED = starlette_hotdeploy.__all__
DATA = {"__version__"}  # exported values that are not classes or functions
# `from starlette_hotdeploy import A, B`, `from starlette_hotdeploy import (\n A,\n B,\n)`, in a
# code block or inline in backquotes.
DOC_IMPORT = re.compile(r"(?:^|`)\s*from starlette_hotdeploy import (\([^)]*\)|[^`\n]+)", re.MULTILINE)


def documented_imports() -> dict[str, list[str]]:
    """Every name the docs import from `starlette_hotdeploy`, and the files that do."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for match in DOC_IMPORT.finditer(doc.read_text()):
            for item in match.group(1).strip("()").split(","):
                name = item.split("#")[0].split(" as ")[0].strip()
                if name:
                    found.setdefault(name, []).append(doc.name)
    return found


def test_all_is_sorted_and_unique() -> None:
    assert list(EXPORTED) == sorted(set(EXPORTED))


def test_nothing_public_leaks() -> None:
    """Every public name of the package is in `__all__`, and `dir()` lists the lazy ones too.
    `testing` is the pytest plugin's module (pytest imports it through its entry point, and
    rewrites the asserts of its distribution's modules: the `@py_` names)."""
    public = {name for name in dir(starlette_hotdeploy) if not name.startswith(("_", "@py_", "@pytest_"))}
    assert public - {"TYPE_CHECKING", "testing"} == set(EXPORTED) - DATA


def test_the_testing_module_exports_what_it_documents() -> None:
    from starlette_hotdeploy import testing

    assert testing.__all__ == sorted(set(testing.__all__))
    for name in testing.__all__:
        value = getattr(testing, name)
        assert value.__module__ == "starlette_hotdeploy.testing"
        assert (vars(value).get("__doc__") or "").strip(), f"testing.{name} has no docstring"
    public = {
        n
        for n, v in vars(testing).items()
        if not n.startswith("_") and getattr(v, "__module__", "") == testing.__name__
    }
    assert public - {"hotdeploy_server", "hotdeploy_host_app", "Traffic"} == set(testing.__all__)


@pytest.mark.parametrize("name", EXPORTED)
def test_every_exported_name_resolves(name: str) -> None:
    """Each name is importable, and a class or function is what its own module defines."""
    value = getattr(starlette_hotdeploy, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert getattr(importlib.import_module(value.__module__), value.__qualname__) is value


@pytest.mark.parametrize("name", sorted(set(EXPORTED) - DATA))
def test_every_exported_name_has_a_docstring(name: str) -> None:
    value = getattr(starlette_hotdeploy, name)
    # A class's own docstring: inspect.getdoc would borrow its base class's.
    doc = vars(value).get("__doc__") if inspect.isclass(value) else value.__doc__
    assert (doc or "").strip(), f"starlette_hotdeploy.{name} has no docstring"


def test_every_exported_exception_is_a_hotdeploy_error() -> None:
    exceptions = {
        name: value
        for name in EXPORTED
        if inspect.isclass(value := getattr(starlette_hotdeploy, name)) and issubclass(value, BaseException)
    }
    assert "AdminProblem" in exceptions  # not only the names that end in Error
    strays = [name for name, value in exceptions.items() if not issubclass(value, HotDeployError)]
    assert strays == [], "exported exceptions must subclass HotDeployError"


def test_an_unload_cleaner_plugin_needs_only_public_names() -> None:
    """`hotdeploy_unloaded` implementations are typed with the exported `Unloaded`."""
    from starlette_hotdeploy import HookSpecs, Unloaded

    hints = inspect.get_annotations(HookSpecs.hotdeploy_unloaded)
    assert hints["unloaded"] == "Unloaded"  # postponed: the name the signature uses
    assert Unloaded.__module__ == "starlette_hotdeploy._cleaners"


def test_the_docs_import_only_exported_names() -> None:
    documented = documented_imports()
    assert {"Deployer", "HotDeployMiddleware", "AdminClient"} <= documented.keys()  # the parser works
    missing = {name: files for name, files in documented.items() if name not in EXPORTED}
    assert missing == {}, "the docs import these from starlette_hotdeploy, but __all__ lacks them"


def run_python(code: str) -> Any:
    """Run `code` in a fresh interpreter; the JSON it printed last."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_package_imports_neither_httpx_nor_click() -> None:
    loaded = run_python(
        "import json, sys, starlette_hotdeploy\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.partition('.')[0] in ('httpx', 'click'))))"
    )
    assert loaded == []


def test_without_httpx_the_client_says_what_to_install() -> None:
    # None in sys.modules makes `import httpx` fail as if it were not installed.
    outcome = run_python(
        "import json, sys\n"
        "sys.modules['httpx'] = sys.modules['click'] = None\n"
        "import starlette_hotdeploy\n"
        "others = [n for n in starlette_hotdeploy.__all__ if n != 'AdminClient']\n"
        "resolved = all(hasattr(starlette_hotdeploy, n) for n in others)\n"
        "try:\n"
        "    from starlette_hotdeploy import AdminClient\n"
        "except ImportError as exc:\n"
        "    print(json.dumps([resolved, str(exc)]))\n"
    )
    assert outcome[0] is True
    assert 'pip install "starlette-hotdeploy[cli]"' in outcome[1]
    assert "AdminClient" in outcome[1]


# -- the Python admin client --------------------------------------------------------------------

URL = "http://hotdeploy.test"


def record(outcome: str, **fields: Any) -> dict[str, Any]:
    return {"id": "d1", "operation": "deploy", "package": "orders", "outcome": outcome, "steps": [], **fields}


def serve(*answers: httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport that answers with `answers` in turn, and the requests it received."""
    queue, seen = list(answers), []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return httpx.MockTransport(handle), seen


def test_the_client_as_the_readme_shows_it() -> None:
    transport, seen = serve(
        httpx.Response(201, json=record("succeeded")),
        httpx.Response(200, json=record("succeeded", operation="rollback")),
    )
    with AdminClient(URL, "secret", transport=transport) as client:
        assert client.upload(b"PK zip")["outcome"] == "succeeded"
        assert client.rollback("orders")["operation"] == "rollback"
    upload, rollback = seen
    assert (upload.method, upload.url.path, upload.url.params["wait"]) == (
        "POST",
        "/_hotdeploy/packages",
        "true",
    )
    assert upload.content == b"PK zip"
    assert upload.headers["authorization"] == "Bearer secret"
    assert (rollback.method, rollback.url.path) == ("POST", "/_hotdeploy/packages/orders/rollback")


def test_a_failed_deployment_is_a_problem_with_its_record() -> None:
    failed = record("failed", error_step="load")
    problem = {
        "title": "package failed to load",
        "status": 422,
        "detail": "orders 2.0: ...",
        "deployment": failed,
    }
    transport, _ = serve(httpx.Response(422, json=problem))
    with AdminClient(URL, "secret", transport=transport) as client, pytest.raises(AdminProblem) as caught:
        client.upload(b"PK zip")
    assert (caught.value.status, caught.value.problem, caught.value.deployment) == (422, problem, failed)
    assert str(caught.value) == "422 package failed to load: orders 2.0: ..."


def test_submit_and_wait_show_every_record() -> None:
    transport, seen = serve(
        httpx.Response(202, json=record("pending")), httpx.Response(200, json=record("succeeded"))
    )
    updates: list[str] = []
    with AdminClient(URL, "secret", transport=transport) as client:
        final = client.wait(client.submit(b"PK zip"), on_update=lambda r: updates.append(r["outcome"]))
    assert final["outcome"] == "succeeded"
    assert updates == ["pending", "succeeded"]
    assert seen[0].url.params["wait"] == "false"
    assert seen[1].url.path == "/_hotdeploy/deployments/d1"


def test_wait_gives_up_with_the_last_record() -> None:
    transport, _ = serve(*[httpx.Response(200, json=record("pending"))] * 100)
    with (
        AdminClient(URL, "secret", transport=transport) as client,
        pytest.raises(DeploymentTimeout) as caught,
    ):
        client.wait(record("pending"), timeout=0.05, interval=0.01)
    assert caught.value.deployment["id"] == "d1"
    assert str(caught.value).startswith("deployment d1 is still pending after 0.05 s (it may still finish")


@pytest.mark.parametrize(
    ("token", "answer", "reason", "hint"),
    [
        (None, httpx.Response(401, json={"title": "unauthorized"}), "no_token", "AdminClient(url, token)"),
        ("wrong", httpx.Response(401, json={"title": "unauthorized"}), "token_refused", "check the token"),
        ("reader", httpx.Response(403, json={"title": "forbidden"}), "forbidden", "may only read"),
        ("secret", httpx.Response(200, text="<html>"), "not_json", "is the admin API served at"),
    ],
)
def test_an_unusable_answer_says_what_to_do_in_python_terms(
    token: str | None, answer: httpx.Response, reason: str, hint: str
) -> None:
    transport, _ = serve(answer)
    with AdminClient(URL, token, transport=transport) as client, pytest.raises(AdminUnreachable) as caught:
        client.undeploy("orders")
    assert caught.value.reason == reason
    assert caught.value.status == answer.status_code
    assert hint in str(caught.value)
    assert "--" not in str(caught.value)  # the CLI's options are the CLI's hints


def test_no_server_is_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with (
        AdminClient(URL, transport=httpx.MockTransport(refuse)) as client,
        pytest.raises(AdminUnreachable) as caught,
    ):
        client.packages()
    assert (caught.value.reason, caught.value.status) == ("connect", None)
    assert str(caught.value).startswith(
        f"cannot connect to {URL} (connection refused): is the server running?"
    )
