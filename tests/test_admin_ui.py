"""The admin web UI end to end: a real headless Chromium (Playwright driving Debian's `chromium`)
against a real uvicorn serving the admin API.

An operator signs in, deploys by choosing an archive (and by dropping one), watches the version change and the traffic
share move, rolls back through the confirmation dialog, and reads why a broken release failed;
follows a canary's weight, step and analysis, promotes it a step and aborts it through the dialog;
the read-only token sees everything and can change nothing; a wrong token is refused and kept
nowhere. The page follows the server through its event stream: each step waits for what the page
shows (Playwright's `expect` retries until its timeout), never for a fixed time.

Without a browser these tests skip, except in CI (`CI` set), where `.ci/run` installs chromium
and a missing browser fails them. `HOTDEPLOY_UI_SCREENSHOT=path` saves the screenshot that
docs/admin-ui.png is made from.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from packages import write_package, zip_directory
from starlette_hotdeploy.testing import HotDeployServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

READ_TOKEN = "reader-token"
TOKEN_KEY = "starlette-hotdeploy.token"
EXPECT_TIMEOUT_MS = 20_000  # a guard for a slow machine; every wait ends as soon as the page shows it


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run the browser tests (.ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _missing("playwright is not installed (the test extra has it)")
    executable = os.environ.get("HOTDEPLOY_CHROMIUM") or shutil.which("chromium")
    if executable is None:
        _missing("no chromium on PATH (apt-get install chromium)")
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HotDeployServer]:
    with HotDeployServer(tmp_path / "home", admin_read_token=READ_TOKEN) as running:
        yield running


@pytest.fixture
def page(browser: Browser, server: HotDeployServer) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(f"{server.url}{server.admin_prefix}/ui/")
    yield opened
    context.close()
    assert errors == [], f"the page raised: {errors}"


def archive(tmp_path: Path, version: str, app: str | None = None) -> Path:
    root = write_package(tmp_path / "sources", "greeter", version, app=app)
    return zip_directory(root, tmp_path / f"greeter-{version}.zip")


def sign_in(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.click("#sign-in-form button[type=submit]")


def served_version(server: HotDeployServer) -> str:
    answer = httpx.get(f"{server.url}/greeter/", timeout=10)
    answer.raise_for_status()
    return str(answer.json()["version"])


@contextmanager
def traffic(server: HotDeployServer, limit: int = 2000) -> Iterator[None]:
    """Requests to greeter from a thread while the block runs (at most `limit`): the page's
    shares are over the last seconds, so they need traffic while the test looks."""
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(limit):
                if stop.is_set():
                    return
                client.get("/greeter/")

    sender = threading.Thread(target=send, name="greeter traffic", daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(timeout=30)


def test_an_operator_deploys_watches_rolls_back_and_reads_why_a_release_failed(
    page: Page, server: HotDeployServer, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    sign_in(page, server.token)
    expect(page.locator("#role")).to_have_text("admin")
    expect(page.locator("#live")).to_be_visible()  # the event stream is open
    expect(page.locator("#no-packages")).to_be_visible()
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") == server.token
    assert page.evaluate("document.cookie") == ""

    card = page.locator('article.package[data-package="greeter"]')
    page.set_input_files("#archive", archive(tmp_path, "1.0"))
    expect(card.locator(".active-version")).to_have_text("1.0")
    page.set_input_files("#archive", archive(tmp_path, "2.0"))
    expect(card.locator(".active-version")).to_have_text("2.0")
    expect(page.locator("#progress-outcome")).to_contain_text("greeter 2.0 is active")
    expect(page.locator('#progress-steps li[data-step="switch"]')).to_have_class("step step-ok")
    assert served_version(server) == "2.0"
    workers = page.locator("#workers tr.worker")
    expect(workers).to_have_count(1)  # this server's one worker, from GET /cluster
    expect(workers.locator("td.serving")).to_have_text("greeter 2.0")

    # Live counts and traffic share, from the traffic events: every request goes to 2.0.
    served = card.locator('td.served[data-version="2.0"]')
    for _ in range(20):
        served_version(server)
    expect(served).to_have_text("21")
    with traffic(server):
        expect(card.locator('td.share[data-version="2.0"] .share-text')).to_have_text("100%")

    # Undeploy asks first; cancelling changes nothing.
    card.locator("button.undeploy").click()
    expect(page.locator("#confirm-text")).to_contain_text("Undeploy greeter?")
    page.click("#confirm-no")
    expect(page.locator("#confirm")).to_be_hidden()
    assert served_version(server) == "2.0"

    card.locator("button.rollback").click()
    expect(page.locator("#confirm-text")).to_have_text("Roll greeter back from 2.0 to 1.0?")
    page.click("#confirm-yes")
    expect(card.locator(".active-version")).to_have_text("1.0")
    assert served_version(server) == "1.0"

    # A release that cannot import: the cause is on the page, 1.0 keeps serving.
    page.set_input_files("#archive", archive(tmp_path, "3.0", app="x = ("))
    outcome = page.locator("#progress-outcome")
    expect(outcome).to_contain_text("failed at load")
    expect(outcome).to_contain_text("syntax error")
    expect(outcome).to_have_class("outcome-failed")
    expect(page.locator('#progress-steps li[data-step="load"]')).to_have_class("step step-failed")
    assert served_version(server) == "1.0"
    expect(card.locator(".active-version")).to_have_text("1.0")

    rows = page.locator("#deployments tr.deployment")
    expect(rows).to_have_count(4)
    expect(rows.first.locator(".outcome")).to_have_text("failed")
    rows.first.click()  # its steps and its cause
    expect(page.locator("#deployments tr.steps .error")).to_contain_text("syntax error")
    expect(rows.nth(1).locator("td").nth(1)).to_have_text("rollback")

    # After the rollback, the traffic goes to 1.0.
    with traffic(server):
        expect(card.locator('td.share[data-version="1.0"] .share-text')).to_have_text("100%")

    shot = page.screenshot(path=tmp_path / "admin-ui.png", full_page=True)
    assert shot.startswith(b"\x89PNG")
    if target := os.environ.get("HOTDEPLOY_UI_SCREENSHOT"):
        Path(target).write_bytes(shot)


DROP = """async ([name, bytes]) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([new Uint8Array(bytes)], name, {type: "application/zip"}));
    const zone = document.getElementById("drop");
    zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
}"""


def test_an_archive_dropped_on_the_page_is_deployed(
    page: Page, server: HotDeployServer, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    sign_in(page, server.token)
    expect(page.locator("#live")).to_be_visible()
    dropped = archive(tmp_path, "1.0")
    page.evaluate(DROP, [dropped.name, list(dropped.read_bytes())])
    card = page.locator('article.package[data-package="greeter"]')
    expect(card.locator(".active-version")).to_have_text("1.0")
    expect(page.locator("#progress-outcome")).to_contain_text("greeter 1.0 is active")
    assert served_version(server) == "1.0"


def test_the_read_only_token_sees_everything_and_can_change_nothing(
    page: Page, server: HotDeployServer, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    server.deploy(archive(tmp_path, "1.0"))
    server.deploy(archive(tmp_path, "2.0"))
    sign_in(page, READ_TOKEN)
    expect(page.locator("#role")).to_have_text("read-only")
    card = page.locator('article.package[data-package="greeter"]')
    expect(card.locator(".active-version")).to_have_text("2.0")
    expect(card.locator("code.mount")).to_have_text("/greeter")
    expect(page.locator("#deployments tr.deployment")).to_have_count(2)
    expect(page.locator("#read-only-note")).to_be_visible()
    expect(page.locator("#drop")).to_be_hidden()
    expect(page.locator("main button:not(.expand)")).to_have_count(0)  # no rollback, activate, undeploy
    page.locator("#deployments button.expand").first.click()  # reading a record's steps is allowed
    expect(page.locator("#deployments tr.steps li.step-ok").first).to_be_visible()

    # And the API refuses what the page does not offer.
    status = page.evaluate(
        """async (key) => (await fetch('../packages/greeter/rollback', {
            method: 'POST', headers: {Authorization: 'Bearer ' + sessionStorage.getItem(key)}})).status""",
        TOKEN_KEY,
    )
    assert status == 403
    assert served_version(server) == "2.0"


def test_a_wrong_token_is_refused_and_kept_nowhere_and_signing_out_forgets_the_right_one(
    page: Page, server: HotDeployServer
) -> None:
    from playwright.sync_api import expect

    sign_in(page, "not-the-token")
    expect(page.locator("#sign-in-error")).to_contain_text("The token was refused")
    expect(page.locator("#console")).to_be_hidden()
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None

    sign_in(page, server.token)
    expect(page.locator("#role")).to_have_text("admin")
    page.reload()  # the tab keeps the token
    expect(page.locator("#role")).to_have_text("admin")
    expect(page.locator("#live")).to_be_visible()
    # Signing out ends the event stream (nothing goes on asking with a forgotten token).
    with page.expect_event("requestfailed", lambda request: "/events" in request.url):
        page.click("#sign-out")
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None
    assert page.context.cookies() == []


def test_an_operator_follows_a_canary_promotes_it_a_step_and_aborts_it(
    page: Page, server: HotDeployServer, browser: Browser, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    server.deploy(archive(tmp_path, "1.0"))
    started = httpx.post(
        f"{server.url}{server.admin_prefix}/packages",
        params={"canary": "10%, 50%"},  # each step until promoted: the page moves it on
        content=archive(tmp_path, "2.0").read_bytes(),
        headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/zip"},
        timeout=30,
    )
    assert started.status_code == 202, started.text
    sign_in(page, server.token)
    card = page.locator('article.package[data-package="greeter"]')
    canary = card.locator(".canary")
    expect(canary.locator(".canary-version")).to_have_text("2.0")
    expect(canary.locator(".canary-weight")).to_have_text("10%")
    expect(canary.locator(".canary-step")).to_have_text("step 1 of 3")
    # The run analyses once a second; without traffic it waits for enough canary requests.
    expect(canary.locator(".verdict")).to_have_text("inconclusive")
    expect(canary.locator(".canary-reason")).to_contain_text("canary requests needed")

    # The read-only token sees the canary and no button to move it.
    reader = browser.new_context().new_page()
    reader.goto(page.url)
    sign_in(reader, READ_TOKEN)
    expect(reader.locator(".canary .canary-weight")).to_have_text("10%")
    expect(reader.locator("main button:not(.expand)")).to_have_count(0)
    reader.context.close()

    canary.locator("button.canary-promote").click()
    expect(page.locator("#confirm-text")).to_contain_text("on to its next step now (from step 1 of 3)")
    page.click("#confirm-yes")
    expect(canary.locator(".canary-weight")).to_have_text("50%")
    expect(canary.locator(".canary-step")).to_have_text("step 2 of 3")

    canary.locator("button.canary-abort").click()
    expect(page.locator("#confirm-text")).to_have_text(
        "Abort the canary greeter 2.0? Its users go back to 1.0; it drains and is unloaded."
    )
    page.click("#confirm-yes")
    expect(canary).to_have_count(0)
    expect(page.locator("#deployments tr.deployment").first.locator(".outcome")).to_have_text("aborted")
    expect(card.locator(".active-version")).to_have_text("1.0")
    assert {served_version(server) for _ in range(20)} == {"1.0"}
