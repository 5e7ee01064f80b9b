"""The service's web page (``GET /``) in a real headless Chromium, against the real service and tritonserver with
the tiny models: load a capability's limits, generate with progress, see refusals, reuse a seed, cancel.

One browser for the module; every test opens the page afresh. Every wait is on the page's own state (WebDriverWait
on the DOM), bounded; the browser's console must stay free of script errors and Content-Security-Policy
violations, and of failed requests other than the refusals a test provokes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.integration.conftest import ServiceUnderTest
from workbench.waiting import wait_until

WAIT_S = 120.0
"""The longest any one wait may take: a generation on the tiny models takes a second or two."""
PROMPT = "a red cube on a table"
SCREENSHOTS = os.environ.get("WEB_PAGE_SCREENSHOTS", "")
"""A folder to save the page's screenshots in, to look at it (nothing is saved when unset)."""


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("the web page's tests need Chromium and its driver on PATH (Debian: apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The web page in the browser, by the ids of its elements."""

    def __init__(self, driver: WebDriver, url: str) -> None:
        self.driver = driver
        self.url = url
        driver.get(url + "/")
        self.wait_for(lambda: self.script("return document.documentElement.dataset.ready") == "true",
                      "the page's script to start")
        self.console_problems()  # start each test with an empty log

    def script(self, source: str, *args: Any) -> Any:
        return self.driver.execute_script(source, *args)

    def wait_for(self, condition: Any, what: str, timeout_s: float = WAIT_S) -> Any:
        return WebDriverWait(self.driver, timeout_s, poll_frequency=0.05).until(
            lambda _: condition(), message=f"{what} did not happen within {timeout_s} s")

    def element(self, identifier: str) -> Any:
        return self.driver.find_element(By.ID, identifier)

    def fill(self, identifier: str, value: str) -> None:
        field = self.element(identifier)
        field.clear()
        if value:
            field.send_keys(value)

    def value(self, identifier: str) -> str:
        return str(self.element(identifier).get_property("value"))

    def text(self, identifier: str) -> str:
        return str(self.script("return document.getElementById(arguments[0]).textContent", identifier))

    def shown(self, identifier: str) -> bool:
        return not self.script("return document.getElementById(arguments[0]).hidden", identifier)

    def load(self, token: str, capability: str) -> None:
        self.fill("token", token)
        self.fill("capability", capability)
        self.element("load").click()
        self.wait_for(lambda: self.shown("limits-box") or self.shown("access-message"), "loading the capability")
        assert not self.shown("access-message"), self.text("access-message")

    def limits(self) -> dict[str, str]:
        return dict(self.script(
            "return [...document.querySelectorAll('#limits > div')]"
            ".map((row) => [row.querySelector('dt').textContent, row.querySelector('dd').textContent])"))

    def options(self, *, width: str = "", height: str = "", steps: str = "", guidance: str = "", seed: str = "",
                negative: str = "") -> None:
        for identifier, value in (("width", width), ("height", height), ("steps", steps), ("guidance", guidance),
                                  ("seed", seed), ("negative", negative)):
            self.fill(identifier, value)

    def generate(self, prompt: str = PROMPT, *, keyboard: bool = False) -> str:
        """Generate (the button, or Ctrl+Enter in the prompt) and wait for the outcome: "image" or "message"."""
        self.fill("prompt", prompt)
        if keyboard:
            self.element("prompt").send_keys(Keys.CONTROL, Keys.ENTER)
        else:
            self.element("generate").click()
        outcome: str = self.wait_for(lambda: self.script(
            "const done = !document.getElementById('generate').disabled;"
            "if (done && !document.getElementById('result').hidden) return 'image';"
            "if (done && !document.getElementById('message').hidden) return 'message';"
            "return null;"), "the generation's end")
        return outcome

    def image(self) -> dict[str, Any]:
        return dict(self.script(
            "const image = document.getElementById('image');"
            "return {src: image.getAttribute('src'), width: image.naturalWidth, height: image.naturalHeight,"
            "        complete: image.complete};"))

    def progress(self) -> tuple[float, float]:
        value, maximum = self.script("const bar = document.getElementById('progress'); return [bar.value, bar.max];")
        return float(value), float(maximum)

    def screenshot(self, name: str, width: int = 1280) -> None:
        if not SCREENSHOTS:
            return
        height = int(self.script("return document.documentElement.scrollHeight"))
        self.driver.set_window_size(width, max(height + 120, 600))
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(Path(SCREENSHOTS) / f"{name}-{width}.png"))
        self.driver.set_window_size(1280, 1000)

    def console_problems(self, *refusals: int) -> list[str]:
        """The console's entries since the last call, less the failed requests of the expected refusals'
        statuses (Chromium logs every 4xx answer of fetch)."""
        problems = []
        for entry in self.driver.get_log("browser"):  # type: ignore[attr-defined]
            message = str(entry.get("message", ""))
            expected = entry.get("source") == "network" and "/v1/" in message and any(
                f"status of {status} " in message for status in refusals)
            if not expected:
                problems.append(f"{entry.get('level')} {entry.get('source')}: {message}")
        return problems


def test_load_shows_the_limits_and_a_generation_shows_its_image_seed_and_full_progress(
        capability_service: ServiceUnderTest, browser: WebDriver) -> None:
    token = capability_service.token_for("web-alice")
    expires_at = capability_service.layer.capabilities.now() + 3600
    capability = capability_service.mint("web-alice", default_model="tiny-sd15",
                                         allowed_models=["tiny-sd15", "tiny-sdxl"], max_width=256, max_height=256,
                                         max_steps=8, max_concurrent=2, expires_at=expires_at)
    page = Page(browser, capability_service.url)
    page.load(token, capability)
    assert page.text("identity") == "Signed in as web-alice."
    limits = page.limits()
    assert limits["Owner"] == "web-alice"
    assert limits["Status"] == "active"
    assert limits["Default model"] == "tiny-sd15"
    assert limits["Allowed models"] == "tiny-sd15, tiny-sdxl"
    assert (limits["Max width"], limits["Max height"], limits["Max steps"], limits["Max concurrent"]) == (
        "256", "256", "8", "2")
    assert "(in 60 min)" in limits["Expires"]
    # The limited options are filled in (a limited capability requires them), the models offered are the allowed.
    assert (page.value("width"), page.value("height"), page.value("steps")) == ("256", "256", "8")
    assert page.text("width-hint") == "a multiple of 8, \N{LESS-THAN OR EQUAL TO} 256 (max_width)"
    select = Select(page.element("model-select"))
    assert [option.get_attribute("value") for option in select.options] == ["tiny-sd15", "tiny-sdxl"]
    assert select.first_selected_option.get_attribute("value") == "tiny-sd15"
    assert page.shown("model-select")
    assert not page.shown("model-text")

    page.options(width="64", height="64", steps="2", guidance="5", seed="1234", negative="blurry")
    assert page.generate() == "image", page.text("message")
    image = page.image()
    assert image["src"].startswith("data:image/png;base64,")
    assert image["complete"]
    assert (image["width"], image["height"]) == (64, 64)
    assert page.text("result-seed") == "1234"
    assert page.text("result-model") == "tiny-sd15"
    assert page.text("result-size") == "64 \N{MULTIPLICATION SIGN} 64"
    value, maximum = page.progress()
    assert maximum >= 2  # the scheduler's passes (SD1.5's PNDM makes one more than asked)
    assert value == maximum
    assert page.text("progress-text").startswith("Done")
    download = page.element("download")
    assert str(download.get_attribute("href")).startswith("blob:")
    assert download.get_attribute("download") == "tiny-sd15-1234.png"
    # The page sent every option as given: the Python API draws the same image from them.
    expected = capability_service.layer.handle("web-alice", capability).text_to_image(
        PROMPT, {"width": 64, "height": 64, "numInferenceSteps": 2, "guidanceScale": 5.0, "negativePrompt": "blurry",
                 "seed": 1234})
    assert image["src"] == "data:image/png;base64," + expected["image"]
    page.screenshot("generated")
    page.screenshot("generated", width=390)
    assert page.console_problems() == []


def test_a_width_above_max_width_shows_the_refusal_and_no_image(capability_service: ServiceUnderTest,
                                                                browser: WebDriver) -> None:
    token = capability_service.token_for("web-bob")
    capability = capability_service.mint("web-bob", default_model="tiny-sd15", max_width=128)
    page = Page(browser, capability_service.url)
    page.load(token, capability)
    assert page.limits()["Max width"] == "128"
    assert page.shown("model-text")  # no allowed_models: a free model id, the default as its placeholder
    assert page.element("model-text").get_attribute("placeholder") == "tiny-sd15"
    page.options(width="256", height="64", steps="2")
    assert page.generate() == "message"
    message = page.text("message")
    assert message.startswith("Refused (denied): ")
    assert f"width=256 exceeds max_width=128 of capability '{capability}'" in message
    assert not page.shown("result")
    assert page.image()["src"] is None
    assert page.text("progress-text") == "Failed."
    page.screenshot("refused", width=390)
    assert page.console_problems(403) == []


def test_an_invalid_option_shows_the_services_message_and_marks_the_field(capability_service: ServiceUnderTest,
                                                                          browser: WebDriver) -> None:
    token = capability_service.token_for("web-carol")
    capability = capability_service.mint("web-carol", default_model="tiny-sd15")
    page = Page(browser, capability_service.url)
    page.load(token, capability)
    page.options(width="100", height="64", steps="2")
    assert page.generate() == "message"
    assert page.text("message") == "Refused (invalid_option): width=100 is invalid: must be a positive multiple of 8"
    assert page.element("width").get_attribute("aria-invalid") == "true"
    assert not page.shown("result")
    assert page.console_problems(400) == []


def test_reuse_seed_fills_the_field_with_the_last_images_seed_and_gives_the_same_image(
        capability_service: ServiceUnderTest, browser: WebDriver) -> None:
    token = capability_service.token_for("web-dave")
    capability = capability_service.mint("web-dave", default_model="tiny-sd15")
    page = Page(browser, capability_service.url)
    page.load(token, capability)
    page.options(width="64", height="64", steps="2")
    assert page.generate() == "image", page.text("message")
    seed = page.text("result-seed")
    assert seed.isdigit()
    first = page.image()["src"]
    generation = page.element("result").get_attribute("data-generation")
    assert page.value("seed") == ""
    page.element("reuse-seed").click()
    assert page.value("seed") == seed
    assert page.driver.switch_to.active_element == page.element("seed")
    assert page.generate(keyboard=True) == "image", page.text("message")
    assert page.element("result").get_attribute("data-generation") != generation
    assert page.text("result-seed") == seed
    assert page.image()["src"] == first
    assert page.console_problems() == []


def test_cancel_stops_the_generation_on_the_server_and_frees_the_slot(capability_service: ServiceUnderTest,
                                                                     browser: WebDriver) -> None:
    token = capability_service.token_for("web-erin")
    capability = capability_service.mint("web-erin", default_model="tiny-sd15", max_concurrent=1)
    page = Page(browser, capability_service.url)
    page.load(token, capability)
    page.options(width="512", height="512", steps="100")  # the most steps the tiny models take
    page.fill("prompt", "a long walk")
    page.element("generate").click()
    page.wait_for(lambda: page.progress()[0] >= 1 or page.shown("message"), "the first step")
    assert not page.shown("message"), page.text("message")
    page.element("cancel").click()
    page.wait_for(lambda: page.text("progress-text").startswith("Cancelled"), "the cancel")
    # The service's own word that it stopped: the stream's "cancelled" error, after the DELETE.
    assert page.text("progress-text").startswith("Cancelled: cancelled by the caller at step ")
    page.screenshot("cancelled")
    assert not page.shown("result")
    assert not page.shown("message")
    assert not page.element("generate").get_attribute("disabled")
    layer = capability_service.layer.capabilities

    def outcomes() -> list[str]:
        return [entry["outcome"] for entry in layer.audit_entries("web-erin", capability_id=capability,
                                                                  action="generate")]

    wait_until(lambda: outcomes() == ["cancelled"], WAIT_S, "the server's record of the cancelled generation")
    page.options(width="64", height="64", steps="2")
    assert page.generate() == "image", page.text("message")  # the one slot is free again
    assert page.console_problems() == []


def test_the_token_stays_out_of_the_url_and_in_the_tab_only_when_asked(capability_service: ServiceUnderTest,
                                                                       browser: WebDriver) -> None:
    token = capability_service.token_for("web-frank")
    capability = capability_service.mint("web-frank", default_model="tiny-sd15")
    page = Page(browser, capability_service.url)
    assert page.element("token").get_attribute("type") == "password"
    page.screenshot("empty")
    page.element("remember").click()
    page.load(token, capability)
    assert token not in browser.current_url
    assert page.script("return localStorage.length") == 0
    browser.refresh()
    page.wait_for(lambda: page.script("return document.documentElement.dataset.ready") == "true", "the reload")
    assert (page.value("token"), page.value("capability")) == (token, capability)
    assert page.element("remember").is_selected()
    page.element("remember").click()  # unticked: forgotten at once
    assert page.script("return Object.keys(sessionStorage).length") == 0
    browser.refresh()
    page.wait_for(lambda: page.script("return document.documentElement.dataset.ready") == "true", "the reload")
    assert (page.value("token"), page.value("capability")) == ("", "")
    # Without a capability id, Load lists the token's capabilities to pick from.
    page.load(token, "")
    assert page.value("capability") == capability
    buttons = browser.find_elements(By.CSS_SELECTOR, "#capability-list button")
    assert [button.get_attribute("data-capability") for button in buttons] == [capability]
    assert page.limits()["Owner"] == "web-frank"  # the only one: picked
    assert page.console_problems() == []


def test_the_interactive_api_documentation_renders_every_route_from_the_service_alone(
        capability_service: ServiceUnderTest, browser: WebDriver) -> None:
    """/docs is Swagger UI from the service's own files (no CDN), and it can read the schema FastAPI writes."""
    browser.get(capability_service.url + "/docs")
    WebDriverWait(browser, WAIT_S).until(
        lambda driver: driver.find_elements(By.CSS_SELECTOR, ".opblock") or
        driver.find_elements(By.CSS_SELECTOR, ".errors-wrapper, .version-pragma"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".version-pragma"), "Swagger UI cannot read the schema"
    summaries = {element.text for element in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/v1/capabilities/{capability_id}/text-to-image", "/v1/generations/{generation_id}",
            "/v1/capabilities/{capability_id}/delegate"} <= summaries, summaries
    requests = [str(entry.get("message", "")) for entry in browser.get_log("browser")]  # type: ignore[attr-defined]
    assert not [message for message in requests if "http" in message and "127.0.0.1" not in message], requests
