"""The web chat in headless Chromium (Selenium + chromedriver): streaming, the thinking panel, stop, new
chat, and model text rendered as text. Skips with a reason when Chromium, chromedriver or the
`selenium` package is missing (`.ci/run` installs Chromium when apt is available).

A screenshot is saved to test-artifacts/web_chat.png for looking at the design.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_serve import fake_model, train_tokenizer

from r1lab.serve import create_app
from r1lab.serve.server import BackgroundServer

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="Chromium and chromedriver are not installed "
                                       "(apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the selenium package is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1100,860",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)  # never Selenium Manager's download
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server():
    model = fake_model(train_tokenizer(), delay=0.01)
    app = create_app(model)
    with BackgroundServer(app) as srv:
        yield srv


def test_web_chat_streams_thinking_and_answer_and_renders_markup_as_text(browser, server):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").text == "fake-r1")
    box = browser.find_element(By.ID, "input")

    def send(text: str) -> None:
        n = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
        box.send_keys(text)
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == n + 1)

    def finished(d) -> bool:
        return d.find_element(By.ID, "stop").get_attribute("hidden") is not None

    send("What is 6 times 7?")
    wait.until(finished)
    reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    thinking = reply.find_element(By.CSS_SELECTOR, "details.thinking")
    assert thinking.is_displayed() and thinking.get_attribute("open") is not None
    assert re.fullmatch(r"Thought for \d+\.\d s", thinking.find_element(By.TAG_NAME, "summary").text)
    assert reply.find_element(By.CSS_SELECTOR, ".thinking-body").text == "step"
    assert reply.find_element(By.CSS_SELECTOR, ".answer").text == "The answer is 42."
    # The panel folds away.
    thinking.find_element(By.TAG_NAME, "summary").click()
    assert not reply.find_element(By.CSS_SELECTOR, ".thinking-body").is_displayed()
    thinking.find_element(By.TAG_NAME, "summary").click()

    send("Now show some markup")
    wait.until(finished)
    answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .answer")[-1]
    assert answer.text == "<script>alert(1)</script> and <b>bold</b> as text."
    assert browser.execute_script("return document.querySelectorAll('script').length") == 1  # app.js only
    assert browser.find_elements(By.CSS_SELECTOR, "#conversation script, #conversation b") == []
    with pytest.raises(NoAlertPresentException):
        _ = browser.switch_to.alert.text
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "web_chat.png"))

    # Stop: the reply ends early and the server cancels the generation.
    worker = server.app.state.worker
    cancelled = worker.stats.cancelled
    send("please ramble")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .thinking-body")[-1].text.count("so on") > 2)
    browser.find_element(By.ID, "stop").click()
    wait.until(finished)
    last = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    assert "Stopped." in last.text
    wait.until(lambda d: worker.stats.cancelled == cancelled + 1)

    # New chat empties the conversation.
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert browser.find_element(By.ID, "empty").is_displayed()
