"""The web page on a class-conditional model, in headless Debian Chromium: the searchable class picker replaces the
prompt box, and picking a class streams previews then shows the 256x256 image (real server + worker on the
shared ImageNet fixture). Skipped without Debian chromium + chromium-driver, like tests/test_browser.py."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import LiveServer
from test_browser import CHROMEDRIVER, CHROMIUM, GENERATION_TIMEOUT_S, _set_value, driver  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                                 reason="needs Debian chromium + chromium-driver")]
FIXTURE = Path(__file__).parent / "fixtures" / "reference-imagenet-tiny-a"


@pytest.fixture(scope="module")
def class_server() -> Iterator[LiveServer]:
    server = LiveServer("--model", str(FIXTURE / "BitDance_tiny_a_4x.pt"), "--model-args",
                        str(FIXTURE / "model_args_4x.json"), "--devices", "cpu", "--preview-every", "16", fake=False)
    try:
        server.wait_ready(180)
        yield server
    finally:
        server.kill()


def test_class_picker_replaces_the_prompt_and_generates(driver, class_server):  # noqa: F811
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(class_server.url + "/")
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.getElementById('class-select').options.length") == 1000)
    assert not driver.find_element(By.ID, "prompt").is_displayed()
    assert not driver.find_element(By.ID, "negative-prompt").is_displayed()
    assert driver.find_element(By.ID, "class-search").is_displayed()
    assert driver.find_element(By.ID, "cfg-schedule").get_attribute("value") == "linear"

    search = driver.find_element(By.ID, "class-search")
    search.send_keys("otter")
    options = driver.execute_script(
        "return [...document.getElementById('class-select').options].map((o) => o.textContent)")
    assert options == ["360 · otter", "175 · otterhound", "739 · potter's wheel"], options  # the exact name first
    assert driver.execute_script("return document.getElementById('class-select').value") == "360"
    search.clear()
    _set_value(driver, "class-search", "20")  # numbers match labels too
    assert driver.execute_script("return document.getElementById('class-select').value") == "20"
    _set_value(driver, "class-search", "goldfish")
    assert driver.execute_script("return document.getElementById('class-select').value") == "1"
    _set_value(driver, "steps", "2")
    driver.find_element(By.ID, "generate").click()

    WebDriverWait(driver, GENERATION_TIMEOUT_S, poll_frequency=0.05).until(
        lambda d: d.execute_script(
            "const r = document.getElementById('result');"
            "if (r.getAttribute('src') && r.complete && r.naturalWidth > 0) return true;"
            "return document.getElementById('error').textContent;"))
    assert not driver.find_element(By.ID, "error").text
    log = driver.execute_script("return window.__sseLog")
    assert "preview" in log and log[-1] == "completed", log
    assert driver.execute_script("const r = document.getElementById('result'); return [r.naturalWidth, "
                                 "r.naturalHeight]") == [256, 256]
    # The page's image is what the API gives for class 1 with the seed the page used.
    seed = int(driver.find_element(By.ID, "seed-used").text)
    src = driver.find_element(By.ID, "result").get_attribute("src")
    import base64

    shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    with class_server.client(timeout=300) as cl:
        r = cl.post("/generate", json={"class_label": 1, "seed": seed, "steps": 2}, headers={"Accept": "image/png"})
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).convert("RGB").tobytes() == shown.tobytes()
