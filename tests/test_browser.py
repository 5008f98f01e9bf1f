"""The page at `/` in a real browser (Debian's headless Chromium through Selenium) against a real server (one
process, the tiny model): a video made from the page shows its progress live and plays in the page, the gallery
lists it and plays it again, and the cancel button cancels a queued video."""
import json
import os
from pathlib import Path

import pytest

from bench.server import KEY, Server

pytestmark = pytest.mark.slow  # a server and a browser

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("Debian chromium + chromium-driver are not installed (.ci/run installs them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402 (after the skip: a machine without the browser needs no selenium)
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

PROMPT = "a paper boat on a pond"
TIMEOUT = 240  # seconds for one tiny video on a small, busy CI machine

# Every change the page makes to the progress bar and the stage, in order (a MutationObserver sees each one, however
# fast the events come, where polling from here would miss the short ones).
WATCH = """
window.seen = {progress: [], stage: []};
const bar = document.getElementById("progress"), stage = document.getElementById("stage");
new MutationObserver((changes) => {  // change i's old value is what change i-1 set: together, every value set
  for (const c of changes.slice(1)) window.seen.progress.push(Number(c.oldValue));
  window.seen.progress.push(Number(bar.getAttribute("aria-valuenow")));
}).observe(bar, {attributes: true, attributeFilter: ["aria-valuenow"], attributeOldValue: true});
new MutationObserver((changes) => {  // textContent = ... puts in a new text node each time (none for "")
  for (const c of changes) window.seen.stage.push(c.addedNodes.length ? c.addedNodes[0].textContent : "");
}).observe(stage, {childList: true});
"""
GALLERY = """return [...document.querySelectorAll("#gallery li")].map(
    (li) => ({id: li.dataset.id, status: li.dataset.status, text: li.innerText}));"""
PLAYER = """const v = document.getElementById("player");
return {id: v.dataset.videoId || null, readyState: v.readyState, duration: v.duration, width: v.videoWidth,
        height: v.videoHeight, error: v.error && v.error.message, hidden: v.hidden};"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_cache):
    server = Server(tmp_path_factory.mktemp("browser"), tiny_cache, 1, f"serve.api_key={KEY}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1000", "--autoplay-policy=no-user-gesture-required",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, read by console_errors
    # The driver's path given: Selenium Manager (which would look for a driver online) is never run.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    """The page, freshly loaded, with the key typed in (as a user would; it stays in the tab's sessionStorage)."""
    browser.get(f"http://{server.host}:{server.port}/")
    key = browser.find_element(By.ID, "api-key")
    assert key.is_displayed()  # the server needs a key, so the page asks for it
    key.clear()
    key.send_keys(KEY)
    browser.find_element(By.ID, "prompt").click()  # leaves the key field: its change event loads the gallery
    yield browser
    assert console_errors(browser) == []


def console_errors(driver):
    """Script errors and refused loads (a Content-Security-Policy violation, a missing asset) in the console."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait(driver, condition, what, timeout=TIMEOUT):
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda d: condition(d), message=what)


def text(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def fill(driver, prompt, size, seconds, seed=None):
    driver.find_element(By.ID, "prompt").clear()
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    Select(driver.find_element(By.ID, "size")).select_by_value(size)
    for element_id, value in (("seconds", seconds), ("seed", seed)):
        driver.find_element(By.ID, element_id).clear()
        if value is not None:
            driver.find_element(By.ID, element_id).send_keys(str(value))


def followed(driver):
    """The id of the video the progress bar follows."""
    return driver.execute_script('return document.getElementById("progress").dataset.videoId || null')


def loaded(driver, video_id):
    """The player's state once it has video_id's video (or an error, or the page's message saying it could not)."""
    def ready(d):
        player = d.execute_script(PLAYER)
        if player["id"] == video_id and (player["readyState"] >= 2 or player["error"]):
            return player
        return {"error": text(d, "message")} if text(d, "message").startswith("could not load") else None
    return wait(driver, ready, f"{video_id} to load in the player", 60)


def screenshot(driver, directory, name):
    directory.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(directory / name))


def test_a_video_made_in_the_page_shows_its_progress_live_and_plays(page, server, tmp_path):
    assert [o.get_attribute("value") for o in Select(page.find_element(By.ID, "size")).options] == [
        "512x512", "736x352", "352x736", "672x384", "384x672", "544x480", "480x544"]  # the API's WIDTHxHEIGHT
    page.execute_script(WATCH)
    fill(page, PROMPT, "512x512", 1, seed=7)
    page.find_element(By.ID, "submit").click()
    wait(page, lambda d: text(d, "status") in ("completed", "failed", "cancelled"), "the video to end")
    video_id = followed(page)
    assert text(page, "status") == "completed", (text(page, "message"), server.output())
    player = loaded(page, video_id)
    screenshot(page, tmp_path, "browser-video.png")
    if os.environ.get("K4FLASH_SCREENSHOT_DIR"):
        screenshot(page, Path(os.environ["K4FLASH_SCREENSHOT_DIR"]), "browser-video.png")

    # It plays: the browser decoded the server's H.264 MP4 (9 frames at 8 fps) at its size.
    assert player["error"] is None and player["readyState"] >= 2 and not player["hidden"], player
    assert 0 < player["duration"] < 10 and (player["width"], player["height"]) == (512, 512), player
    # The bar moved with the server's events: above 0 before it reached 100, never back; denoising was shown.
    seen = page.execute_script("return window.seen")
    progress = seen["progress"]
    assert progress and progress[-1] == 100 and any(0 < p < 100 for p in progress), seen
    assert progress == sorted(progress), seen
    assert any("denoising" in stage for stage in seen["stage"]), seen
    assert json.loads(server.status(f"/v1/videos/{video_id}")[1])["status"] == "completed"


def test_the_gallery_lists_the_video_and_plays_it(page, server):
    [(video_id, listed)] = wait(page, lambda d: [(li["id"], li["text"]) for li in d.execute_script(GALLERY)
                                                 if li["status"] == "completed" and PROMPT in li["text"]],
                                "the first test's video in the gallery", 30)
    assert "seed 7" in listed and "512x512" in listed and "1 s" in listed, listed
    assert page.execute_script(PLAYER)["id"] is None  # a fresh page: nothing plays until it is picked
    # Found afresh at the click, and again if the list was redrawn in between (a stale element).
    wait(page, lambda d: d.find_element(By.CSS_SELECTOR, f"#gallery li[data-id={video_id}]").click() or True,
         "a click on it", 30)
    player = loaded(page, video_id)
    assert player["error"] is None and player["readyState"] >= 2 and player["duration"] > 0, player


def test_cancel_takes_a_queued_video_off_the_queue(page, server):
    fill(page, "a long one, first in line", "512x512", 2)
    page.find_element(By.ID, "submit").click()
    wait(page, lambda d: followed(d) is not None, "the first video to be accepted", 30)
    first = followed(page)
    fill(page, "the one to cancel", "512x512", 1, seed=11)
    page.find_element(By.ID, "submit").click()
    wait(page, lambda d: followed(d) not in (None, first), "the second video to be accepted", 30)
    second = followed(page)
    wait(page, lambda d: d.find_element(By.ID, "cancel").is_enabled(), "the cancel button", 30)
    assert "in the queue" in text(page, "stage")  # the first one takes seconds: the second waits behind it
    page.find_element(By.ID, "cancel").click()
    wait(page, lambda d: text(d, "status") == "cancelled", "the page to show the cancel", 60)
    assert "cancelled" in text(page, "message")
    assert json.loads(server.status(f"/v1/videos/{second}")[1])["status"] == "cancelled"
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f"#gallery li[data-id={second}][data-status=cancelled]"),
         "the gallery to show it cancelled", 30)
    assert server.wait(first, timeout=TIMEOUT)["status"] == "completed"  # the one before it was not touched
