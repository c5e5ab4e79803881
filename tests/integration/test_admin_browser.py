"""The admin page in headless Chromium (Selenium) against the daemon on 127.0.0.1.

The browser logs in with HTTP Digest itself: the first URL carries the credentials
(``http://user:password@host/``), which Chromium uses to answer the 401 challenge of
a top-level navigation and keeps for the rest of ``/admin/``.  Selenium blocks, so the
browser runs in a thread while the reactor serves the daemon.  Screenshots go to the
test's tmp_path (printed).  Skipped when chromium or chromedriver is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread, deferToThread

from relayd.testing import (
    RelayPKI,
    consent_rule,
    consent_ruleset,
    prepared_relay,
    relay_config_overrides,
    relay_service,
)
from relayd.testing import write_users as write_users_file
from relayd.web.admin import CONFLICT_TEXT
from relayd.xcap.service import XCAPService

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
REALM = "relayd-test"
USERS = {"alice": "alice-pw", "root": "root-pw"}
ALICE = f"sip:alice@{REALM}"
LIST = "sip:friends@relay.example.test"
TIMEOUT_SECONDS = 30


def async_test(
    function: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., Deferred[None]]:
    return cast(Callable[..., Deferred[None]], pytest_twisted.ensureDeferred(function))


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (installed by .ci/run as root)")
    pytest.importorskip("selenium", reason="needs selenium (pip install -e '.[test]')")
    return browser, driver


def _browser_session(
    browser: str, driver: str, base: str, shots: Path, interfere: Callable[[], object]
) -> dict[str, Any]:
    """Log in as alice, grant, find the rule in the table, revoke, then grant from a
    page ``interfere`` made stale; return what was seen."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    def submit(button: WebElement) -> None:
        """Click a form's button and wait until its answer replaced the page."""
        page = chrome.find_element(By.TAG_NAME, "html")
        button.click()
        WebDriverWait(chrome, TIMEOUT_SECONDS).until(expected_conditions.staleness_of(page))

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    seen: dict[str, Any] = {}
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        chrome.set_page_load_timeout(TIMEOUT_SECONDS)
        chrome.get(f"http://alice:{USERS['alice']}@{base}/admin/")
        seen["signed in"] = chrome.find_element(By.ID, "xui").text
        chrome.save_screenshot(str(shots / "1-signed-in.png"))

        grant = chrome.find_element(By.ID, "grant")
        grant.find_element(By.NAME, "sender").send_keys("bob")
        grant.find_element(By.NAME, "list").send_keys(LIST)
        grant.find_element(By.NAME, "methods").send_keys("MESSAGE INVITE")
        submit(grant.find_element(By.CSS_SELECTOR, "button[type=submit]"))
        seen["notice"] = chrome.find_element(By.ID, "notice").text
        rows = chrome.find_elements(By.CSS_SELECTOR, "#rules tbody tr")
        seen["rows after grant"] = [
            [cell.text for cell in row.find_elements(By.TAG_NAME, "td")[:4]] for row in rows
        ]
        chrome.save_screenshot(str(shots / "2-granted.png"))

        submit(chrome.find_element(By.CSS_SELECTOR, "#rules button.danger"))
        seen["notice after revoke"] = chrome.find_element(By.ID, "notice").text
        seen["rows after revoke"] = [
            row.text for row in chrome.find_elements(By.CSS_SELECTOR, "#rules tbody tr")
        ]
        chrome.save_screenshot(str(shots / "3-revoked.png"))

        interfere()  # another client changes the document behind the page
        grant = chrome.find_element(By.ID, "grant")
        grant.find_element(By.NAME, "sender").send_keys("carol")
        grant.find_element(By.NAME, "list").send_keys(LIST)
        submit(grant.find_element(By.CSS_SELECTOR, "button[type=submit]"))
        seen["conflict"] = chrome.find_element(By.ID, "error").text
        seen["rows after conflict"] = [
            row.find_element(By.TAG_NAME, "td").text
            for row in chrome.find_elements(By.CSS_SELECTOR, "#rules tbody tr")
        ]
        chrome.save_screenshot(str(shots / "4-conflict.png"))
    finally:
        chrome.quit()
    return seen


@async_test
async def test_log_in_grant_see_the_rule_and_revoke(tmp_path: Path, pki: RelayPKI) -> None:
    browser, driver = _chromium()
    cert, key = pki.leaf(HOST)
    users = write_users_file(tmp_path / "users.htdigest", REALM, USERS)
    overrides = relay_config_overrides(
        str(tmp_path / "data"),
        HOST,
        cert,
        key,
        users,
        extra={("xcap", "listen"): f"tcp:0:interface={HOST}", ("xcap", "admins"): "root"},
    )
    service = relay_service(prepared_relay(overrides), reactor)
    service.startService()
    try:
        xcap: XCAPService = service.getServiceNamed("xcap")
        ports = await xcap.listening.addTimeout(TIMEOUT_SECONDS, reactor)
        address: Any = ports[0].getHost()
        changes: list[Any] = []
        xcap.store.add_listener(changes.append)
        shots = tmp_path / "screenshots"
        shots.mkdir()
        print(f"admin page screenshots: {shots}")
        theirs = consent_ruleset(consent_rule("theirs", "sip:dave@relayd-test", LIST))

        def interfere() -> object:
            def put() -> Deferred[Any]:
                return xcap.store.put_document("consent-rules", ALICE, "index", theirs)

            return blockingCallFromThread(cast(Any, reactor), put)

        seen = await deferToThread(
            _browser_session, browser, driver, f"{HOST}:{address.port}", shots, interfere
        )
    finally:
        await service.stopService()

    assert seen["signed in"] == ALICE
    assert "granted rule" in seen["notice"]
    ((rule_id, sender, via, methods),) = seen["rows after grant"]
    assert (sender, via, methods) == ("sip:bob@relayd-test", LIST, "MESSAGE INVITE")
    assert seen["notice after revoke"] == f"revoked rule {rule_id}"
    assert seen["rows after revoke"] == [f"No rules: nobody reaches {ALICE} through a list yet."]
    assert seen["conflict"] == CONFLICT_TEXT
    assert seen["rows after conflict"] == ["theirs"]
    # Both edits reached the store's listeners, as an XCAP PUT's would; the stale
    # form wrote nothing.
    assert [(c.auid, c.xui) for c in changes] == [("consent-rules", ALICE)] * 3
    assert sorted(p.name for p in shots.iterdir()) == [
        "1-signed-in.png",
        "2-granted.png",
        "3-revoked.png",
        "4-conflict.png",
    ]
