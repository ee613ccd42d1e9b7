"""The web page in a real browser: Debian's headless Chromium, driven by Selenium, on a real gunicorn.

Selenium never downloads anything: the driver path is given explicitly (so Selenium Manager is
skipped) and SE_OFFLINE is set in case anything consults it anyway.
"""
from __future__ import annotations

import os
import shutil

import pytest
import requests

from support.processes import track
from support.servers import Daemon

HAVE_BROWSER = os.access("/usr/bin/chromedriver", os.X_OK) and shutil.which("chromium")
# CI installs the browser (make test-deps), so there a missing one is a failure, not a skip
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not HAVE_BROWSER and not os.environ.get("CI"),
                                 reason="needs Debian's chromium and chromium-driver (make test-deps)")]

CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage")
WAIT_S = 60
KEY = "browser-test-key"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, cache_dir):
    """builtin:tiny with replies long enough to see (8 to 16 tokens)."""
    with Daemon(tmp_path_factory.mktemp("web"), cache_dir,
                "--min-new-tokens", "8", "--max-new-tokens", "16") as d:
        yield d


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """A fresh headless Chromium profile in this test's folder, its console captured."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")
    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for flag in FLAGS + (f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER,
                                              log_output=str(tmp_path / "chromedriver.log")),
                              options=opts)
    track(driver.service.process)  # chromedriver; Chromium runs under it
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, predicate, what: str):
    """Wait until predicate(driver) is truthy; the failure names what was awaited."""
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(predicate, message=what)


def text_of(driver, css: str) -> str:
    return driver.find_element("css selector", css).text


def messages(driver) -> list[tuple[str, str]]:
    """(role, text) of every message shown, read from the DOM."""
    return [tuple(pair) for pair in driver.execute_script(
        "return Array.from(document.querySelectorAll('#log li.msg')).map(li => "
        "[li.classList.contains('user') ? 'user' : 'assistant', li.querySelector('.text').textContent]);")]


def replies_done(n: int):
    """Predicate: n assistant replies shown, none still streaming, each with text."""
    def check(driver) -> bool:
        done = driver.execute_script(
            "return Array.from(document.querySelectorAll('#log li.assistant'))"
            ".filter(li => !li.classList.contains('streaming') && li.querySelector('.text').textContent)"
            ".length;")
        return done >= n
    return check


def say(driver, *keys) -> None:
    driver.find_element("id", "message").send_keys(*keys)


def probe_console(driver) -> None:
    """Prove the console capture works (so 'no errors' below means something), then drain it."""
    driver.execute_script("console.error('edgechat-console-probe')")
    assert any("edgechat-console-probe" in e["message"] for e in driver.get_log("browser"))


def test_chat_page_streams_keeps_history_and_reloads(daemon, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys
    browser.get(daemon.url + "/")
    probe_console(browser)
    wait(browser, lambda d: "builtin:tiny" in text_of(d, "#model-chip"), "first /v1/stats reading")
    assert text_of(browser, "#history-count") == "0 / 10"
    assert browser.find_element("id", "spark").get_attribute("data-points") == "0"

    say(browser, "Hello, who are you?", Keys.ENTER)  # Enter sends
    wait(browser, replies_done(1), "first streamed reply")
    wait(browser, lambda d: text_of(d, "#history-count") == "2 / 10", "history counter after turn 1")
    wait(browser, lambda d: d.find_element("id", "spark").get_attribute("data-points") == "1",
         "sparkline with one turn")

    say(browser, "Tell me more", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "in two lines", Keys.ENTER)
    wait(browser, replies_done(2), "second streamed reply")
    wait(browser, lambda d: text_of(d, "#history-count") == "4 / 10", "history counter after turn 2")
    wait(browser, lambda d: d.find_element("id", "spark").get_attribute("data-points") == "2",
         "sparkline with two turns")
    points = browser.find_element("id", "spark-line").get_attribute("points").split()
    assert len(points) == 2

    shown = messages(browser)
    assert [r for r, _ in shown] == ["user", "assistant", "user", "assistant"]
    assert shown[2][1] == "Tell me more\nin two lines"  # Shift+Enter added a line, did not send
    session = browser.execute_script("return localStorage.getItem('edgechat.session');")
    stored = requests.get(f"{daemon.url}/v1/sessions/{session}", timeout=10).json()
    # what streamed into the page is exactly what the server stored
    assert [(m["role"], m["content"]) for m in stored["messages"]] == shown

    browser.refresh()
    wait(browser, lambda d: len(messages(d)) == 4, "conversation restored after reload")
    assert messages(browser) == shown
    wait(browser, lambda d: text_of(d, "#history-count") == "4 / 10", "history counter after reload")
    assert browser.find_element("id", "spark").get_attribute("data-points") == "2"

    # offline: every resource the page loaded came from the daemon itself
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);")
    assert loaded and all(url.startswith(daemon.url + "/") for url in loaded), loaded

    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors


def test_phone_width_has_no_sideways_scroll(daemon, browser, tmp_path):
    # a headless window cannot be narrower than ~500 px: emulate a phone's viewport instead
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    browser.get(daemon.url + "/")
    wait(browser, lambda d: "builtin:tiny" in text_of(d, "#model-chip"), "first /v1/stats reading")
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth];")
    assert width == [390, 390], width
    # one column: the side panel sits below the conversation, not beside it
    chat = browser.find_element("css selector", "main.chat").rect
    panel = browser.find_element("css selector", "aside.panel").rect
    assert panel["y"] >= chat["y"] + chat["height"] - 1
    assert browser.save_screenshot(str(tmp_path / "phone.png"))


@pytest.fixture(scope="module")
def keyed_daemon(tmp_path_factory, cache_dir):
    with Daemon(tmp_path_factory.mktemp("web-keys"), cache_dir, "--api-keys", KEY,
                "--max-new-tokens", "8") as d:
        yield d


def test_api_key_field(keyed_daemon, browser):
    from selenium.webdriver.common.keys import Keys
    browser.get(keyed_daemon.url + "/")
    wait(browser, lambda d: "API key" in text_of(d, "#stats-status"), "stats refused without a key")
    say(browser, "Hello", Keys.ENTER)
    wait(browser, lambda d: "API key" in text_of(d, "#notice"), "the 401 in plain words")
    assert browser.find_element("id", "settings").get_attribute("open") is not None
    assert browser.find_element("id", "message").get_attribute("value") == "Hello"  # given back
    assert messages(browser) == []

    key_field = browser.find_element("id", "api-key")
    key_field.send_keys(KEY, Keys.TAB)  # change event stores it in sessionStorage
    assert browser.execute_script("return sessionStorage.getItem('edgechat.apiKey');") == KEY
    assert browser.execute_script("return localStorage.getItem('edgechat.apiKey');") is None
    wait(browser, lambda d: "builtin:tiny" in text_of(d, "#model-chip"), "stats with the key")
    browser.find_element("id", "send").click()
    wait(browser, replies_done(1), "reply with the key")
    wait(browser, lambda d: text_of(d, "#history-count") == "2 / 10", "history counter with the key")
