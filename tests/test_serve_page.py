"""The live page at ``/`` in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
Selenium) adds a stream from a local test source through the page's form, sees its frame and an answer appear, adds
an alert and sees its banner, and asks a question about the stream. ``VREASON_PAGE_SHOT=path`` keeps a screenshot.

Skipped where Chromium, its driver or Selenium is missing (``.ci/run`` installs them)."""

from __future__ import annotations

import os
import shutil
import time

import pytest

pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from runtime.reasoner import Reasoner  # noqa: E402
from runtime.serve import app  # noqa: E402
from tests.helpers import serving  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
KEY = "page-key"


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    from models.samples import sample_video

    root = tmp_path_factory.mktemp("page-media")
    sample_video(root / "circle.mp4", "circle", "red", "right", seconds=2, fps=8)
    reasoner = Reasoner.load(engine_dir, backend="ort", reuse_mb=64)
    url, stop = serving(app(reasoner=reasoner, api_key=KEY, media_root=root))
    yield url
    stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1360,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)  # the driver on disk: nothing downloaded
    yield driver
    driver.quit()


def wait_for(check, what: str, limit_s: float = 60.0):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"the page did not show {what} in {limit_s:g} s")


def test_the_live_page_adds_a_stream_shows_answers_and_alerts_and_asks(server, browser):
    from selenium.webdriver.common.by import By

    b = browser
    b.get(server + "/")
    wait_for(lambda: "API key" in b.find_element(By.ID, "model").text, "that it needs the key")
    b.find_element(By.ID, "key").send_keys(KEY + "\n")
    wait_for(lambda: b.find_element(By.ID, "model").text.endswith("· ort"), "the model and its backend")

    form = b.find_element(By.ID, "add-stream")
    form.find_element(By.NAME, "url").send_keys("circle.mp4")
    form.find_element(By.NAME, "name").send_keys("lobby")
    form.find_element(By.NAME, "questions").send_keys("Which way does the circle move?")
    form.find_element(By.NAME, "window").clear()
    form.find_element(By.NAME, "window").send_keys("1")
    form.find_element(By.NAME, "every").clear()
    form.find_element(By.NAME, "every").send_keys("1")
    form.find_element(By.NAME, "loop").click()
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    card = wait_for(lambda: b.find_elements(By.CSS_SELECTOR, ".stream[data-id]"), "the stream's card")[0]
    assert "lobby" in card.text
    wait_for(lambda: card.find_element(By.CSS_SELECTOR, ".qa .meta").text.startswith("window"), "an answer")
    wait_for(lambda: b.execute_script("return arguments[0].naturalWidth", card.find_element(By.TAG_NAME, "img")),
             "the stream's latest frame")
    wait_for(lambda: card.find_element(By.CSS_SELECTOR, "svg.trace").get_attribute("data-points"),
             "the latest answer's entropy trace")

    alert = b.find_element(By.ID, "add-alert")
    wait_for(lambda: alert.find_elements(By.CSS_SELECTOR, "option"), "the stream in the alert form")
    alert.find_element(By.NAME, "question").send_keys("Is anything moving?")
    alert.find_element(By.NAME, "trigger").send_keys(".*")
    alert.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    banner = wait_for(lambda: card.find_elements(By.CSS_SELECTOR, ".alert-banner"), "an alert banner")[0]
    assert banner.text.startswith("ALERT")
    wait_for(lambda: "lobby" in b.find_element(By.ID, "recent").text, "the alert among the recent ones")

    ask = b.find_element(By.ID, "ask")
    from selenium.webdriver.support.select import Select

    Select(ask.find_element(By.NAME, "about")).select_by_visible_text("lobby")
    ask.find_element(By.NAME, "question").send_keys("What color is the circle?")
    ask.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    out = b.find_element(By.ID, "ask-answer")
    wait_for(lambda: out.get_attribute("data-done") == "1", "the answer to the question")
    assert out.text.strip() and not ask.find_element(By.CSS_SELECTOR, ".error").text
    assert int(b.find_element(By.ID, "ask-trace").get_attribute("data-points")) >= 1

    shot = os.environ.get("VREASON_PAGE_SHOT")
    b.execute_script("window.scrollTo(0, 0)")
    if shot:
        b.save_screenshot(shot)
    png = b.get_screenshot_as_png()
    assert png[:4] == b"\x89PNG" and len(png) > 10_000
    # nothing reached the browser's console as an error
    try:
        logs = b.get_log("browser")
    except Exception:  # noqa: BLE001 (not every driver keeps the console)
        logs = []
    # (the one 401: the page's first look, before the key was typed in)
    assert not [e for e in logs if e.get("level") == "SEVERE" and "status of 401" not in e.get("message", "")], logs
