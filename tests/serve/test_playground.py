"""The playground page at / in a real headless browser (Debian's chromium + chromedriver, selenium):
load it, send a prompt, move a slider, see the answer and the routing change; saves a screenshot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "playground.png"

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,760", "--no-proxy-server"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_playground_chat_slider_and_routing(mocae, serve, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 30)
    with serve(mocae, max_tokens_cap=64) as srv:
        browser.get(srv.url + "/")
        wait.until(lambda d: d.find_elements(By.ID, "slider-honest"))
        assert "tiny-mocae" in browser.find_element(By.ID, "model").text
        max_tokens = browser.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("12")

        def ask(text, n):
            browser.find_element(By.ID, "prompt").send_keys(text)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer[data-done='1']")) == n)
            answer = browser.find_elements(By.CSS_SELECTOR, ".answer")[-1]
            bars = {b.get_attribute("data-axis"): float(b.get_attribute("data-weight"))
                    for b in answer.find_elements(By.CSS_SELECTOR, ".bar")}
            mode = answer.find_element(By.CSS_SELECTOR, ".mode").text
            return answer.find_element(By.CSS_SELECTOR, ".content").text, bars, mode

        browser.find_element(By.ID, "reset").click()  # each message its own conversation
        text1, routed, mode1 = ask("tell me about water", 1)
        assert mode1 == "routing: blend" and set(routed) == {"helpful", "harmless", "honest"}
        assert sum(routed.values()) == pytest.approx(1, abs=1e-3)
        direct = mocae.chat("tell me about water", max_new_tokens=12)[0]
        assert text1.strip() == direct["text"].strip()

        Select(browser.find_element(By.ID, "mode")).select_by_value("weights")
        slider = browser.find_element(By.ID, "slider-honest")
        slider.click()
        for _ in range(50):  # the keyboard moves it as a person would: honest 50 -> 100
            slider.send_keys(Keys.ARROW_RIGHT)
        for axis in ("helpful", "harmless"):
            s = browser.find_element(By.ID, f"slider-{axis}")
            s.click()
            for _ in range(50):
                s.send_keys(Keys.ARROW_LEFT)
        assert browser.find_element(By.ID, "value-honest").text == "100"
        text2, steered, mode2 = ask("tell me about water", 2)
        assert mode2 == "routing: axis_weights"
        assert steered == pytest.approx({"helpful": 0.0, "harmless": 0.0, "honest": 1.0}, abs=1e-4)
        expected = mocae.chat("tell me about water", max_new_tokens=12, axis_weights={"honest": 1})[0]["text"]
        assert text2.strip() == expected.strip()
        assert steered != routed
        # MOCAE_SAVE_SCREENSHOT=1 refreshes the committed one (tiny-random's answers are random bytes)
        shot = SCREENSHOT if os.environ.get("MOCAE_SAVE_SCREENSHOT") else tmp_path / "playground.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
