"""End-to-end test of the web page at ``/`` in headless Debian Chromium, driven by Selenium.

It starts the real server (uvicorn + model worker) on the tiny reference checkpoint, opens the page, generates
an image and checks that live previews were shown before the final image, then checks that a validation error
is displayed. Needs the Debian packages ``chromium`` and ``chromium-driver`` (skipped when absent) and the
PyPI package ``selenium``; Selenium never downloads a driver here (fixed paths below).

Set ``BITDANCE_BROWSER_SCREENSHOT=/some/file.png`` to keep a screenshot of the finished page, and
``BITDANCE_BROWSER_BASE_URL=http://host:port`` to test a server that is already running instead of starting one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "reference-tiny-a"
SERVER_START_TIMEOUT_S = 180.0
GENERATION_TIMEOUT_S = 180.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason=f"needs Debian chromium + chromium-driver ({CHROMIUM}, {CHROMEDRIVER})",
    ),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base_url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before ready:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(base_url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"server not ready after {SERVER_START_TIMEOUT_S:.0f}s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("BITDANCE_BROWSER_BASE_URL"):
        yield os.environ["BITDANCE_BROWSER_BASE_URL"].rstrip("/")
        return
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ)
    env.pop("BITDANCE_API_KEY", None)  # the page is tested without auth
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--model",
        str(MODEL),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--devices",
        "cpu",
        "--preview-every",
        "1",  # a preview after every AR step
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(base_url, proc, log_path)
        yield base_url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def driver() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="bitdance-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _open_page(driver, base_url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base_url + "/")
    # /info filled the size list and the limits.
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.getElementById('size').options.length") > 0
    )


def _set_value(driver, element_id: str, value: str) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input', {bubbles: true})); e.dispatchEvent(new Event('change', {bubbles: true}));",
        element_id,
        value,
    )


def _choose_size(driver, want: str = "64x64") -> tuple[int, int]:
    """Select ``want`` (W x H; 16 tokens = 4 AR steps on the tiny checkpoint, so several previews), else the
    smallest size of at least 64x64 on offer; returns (width, height)."""
    return tuple(
        driver.execute_script(
            "const s = document.getElementById('size'); const area = (o) => o.dataset.width * o.dataset.height;"
            "let best = [...s.options].find((o) => o.value === arguments[0]);"
            "if (!best) for (const o of s.options) if (area(o) >= 4096 && (!best || area(o) < area(best))) best = o;"
            "best = best || s.options[s.options.length - 1];"
            "s.value = best.value; s.dispatchEvent(new Event('change', {bubbles: true}));"
            "return [Number(best.dataset.width), Number(best.dataset.height)];",
            want,
        )
    )


@pytest.mark.slow
def test_page_streams_previews_then_shows_the_image(driver, server_url: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open_page(driver, server_url)
    for element_id in (
        "prompt",
        "size",
        "steps",
        "guidance",
        "seed",
        "random-seed",
        "generate",
        "cancel",
        "progress",
        "preview",
        "result",
        "status",
        "seed-used",
        "error",
    ):
        assert driver.find_elements(By.ID, element_id), f"#{element_id} missing"
    steps = driver.find_element(By.ID, "steps")
    assert steps.get_attribute("min") and steps.get_attribute("max"), "steps limits from /info not applied"
    width, height = _choose_size(driver)
    _set_value(driver, "steps", str(max(int(steps.get_attribute("min")), 2)))
    driver.find_element(By.ID, "prompt").send_keys("a red circle on a white background")
    assert driver.find_element(By.ID, "random-seed").is_selected()
    driver.find_element(By.ID, "generate").click()

    wait = WebDriverWait(driver, GENERATION_TIMEOUT_S, poll_frequency=0.05)
    wait.until(
        lambda d: d.execute_script(
            "const r = document.getElementById('result');"
            "if (r.getAttribute('src') && r.complete && r.naturalWidth > 0) return true;"
            "return document.getElementById('error').textContent;"
        )
    )
    error = driver.find_element(By.ID, "error").text
    assert not error, f"page shows an error: {error}"

    # At least one preview streamed in, and it was shown before the final image got its src.
    previews = int(driver.find_element(By.ID, "preview").get_attribute("data-count"))
    assert previews >= 1
    assert driver.execute_script("return window.__previewCount") == previews
    result = driver.find_element(By.ID, "result")
    assert int(result.get_attribute("data-previews-before-result")) >= 1
    log = driver.execute_script("return window.__sseLog")
    assert log[-1] == "completed" and "preview" in log and log.index("preview") < log.index("completed"), log

    natural = driver.execute_script(
        "const r = document.getElementById('result'); return [r.naturalWidth, r.naturalHeight];"
    )
    assert natural == [width, height]
    seed_used = driver.find_element(By.ID, "seed-used").text
    assert seed_used.isdigit(), seed_used
    # Small images are scaled up (pixelated) to at least 384 CSS pixels on the long side.
    if max(width, height) < 384:
        shown = result.size
        assert max(shown["width"], shown["height"]) >= 380, shown
        assert "pixelated" in result.get_attribute("class")
    assert driver.find_element(By.ID, "download").get_attribute("href").startswith("blob:")
    assert driver.find_element(By.ID, "generate").is_enabled()
    assert not driver.find_element(By.ID, "cancel").is_enabled()
    assert "Done" in driver.find_element(By.ID, "status").text

    shot = Path(os.environ.get("BITDANCE_BROWSER_SCREENSHOT") or tmp_path / "page.png")
    assert driver.save_screenshot(str(shot))


def test_page_shows_validation_errors(driver, server_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open_page(driver, server_url)
    too_many = int(driver.find_element(By.ID, "steps").get_attribute("max")) + 1
    _set_value(driver, "steps", str(too_many))
    driver.find_element(By.ID, "prompt").send_keys("a blue square")
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "error").text.strip())
    error = driver.find_element(By.ID, "error").text
    assert "steps" in error, error
    assert not driver.find_element(By.ID, "result").get_attribute("src")
    assert driver.find_element(By.ID, "generate").is_enabled()


@pytest.mark.slow
def test_sse_parser_handles_any_chunking(driver, server_url: str) -> None:
    """The page's SSE parser gives the same events however the stream is split (CRLF, comments, no final blank)."""
    driver.get(server_url + "/")
    stream = (
        ": keep-alive\r\n\r\n"
        'event: queued\r\ndata: {"position": 2}\r\n\r\n'
        'event: progress\ndata: {"step": 1,\ndata:  "total_steps": 4}\n\n'
        'event: preview\rdata: {"step": 1, "b64_json": "/9j/AA=="}\r\r'
        'event: completed\ndata: {"seed": 5}'
    )
    events = driver.execute_script(
        """
        const [text, size] = arguments;
        const out = [];
        const p = new window.BitDanceSSEParser((name, data) => out.push([name, JSON.parse(data)]));
        for (let i = 0; i < text.length; i += size) p.push(text.slice(i, i + size));
        p.end();
        return out;
        """,
        stream,
        1,
    )
    expected = [
        ["queued", {"position": 2}],
        ["progress", {"step": 1, "total_steps": 4}],
        ["preview", {"step": 1, "b64_json": "/9j/AA=="}],
        ["completed", {"seed": 5}],
    ]
    assert events == expected
    for size in (2, 3, 7, 1000):
        assert (
            driver.execute_script(
                """
            const [text, size] = arguments; const out = [];
            const p = new window.BitDanceSSEParser((name, data) => out.push([name, JSON.parse(data)]));
            for (let i = 0; i < text.length; i += size) p.push(text.slice(i, i + size));
            p.end(); return out;
            """,
                stream,
                size,
            )
            == expected
        )


@pytest.mark.slow
def test_cancel_stops_the_request_on_the_server(driver, server_url: str, tmp_path: Path) -> None:
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open_page(driver, server_url)
    _choose_size(driver, "512x512")  # 256 AR steps: long enough to cancel mid-way
    _set_value(driver, "steps", "50")
    driver.find_element(By.ID, "prompt").send_keys("a long one")
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, GENERATION_TIMEOUT_S, poll_frequency=0.05).until(
        lambda d: "progress" in d.execute_script("return window.__sseLog")
    )
    assert driver.find_element(By.ID, "cancel").is_enabled()
    assert not driver.find_element(By.ID, "generate").is_enabled()
    # both counts, named for what they are: patches (AR steps) and diffusion steps per patch
    status = driver.find_element(By.ID, "status").text
    assert re.fullmatch(r"Generating… patch \d+/256 · 50 diffusion steps each", status), status
    shot = os.environ.get("BITDANCE_BROWSER_SCREENSHOT")
    driver.save_screenshot(shot[:-4] + "-running.png" if shot else str(tmp_path / "running.png"))
    driver.find_element(By.ID, "cancel").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "status").text == "Cancelled")
    assert not driver.find_element(By.ID, "error").text
    assert not driver.find_element(By.ID, "result").get_attribute("src")
    assert driver.find_element(By.ID, "generate").is_enabled()
    assert "completed" not in driver.execute_script("return window.__sseLog")

    # The aborted fetch cancels the request in the engine: nothing stays in flight.
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(server_url + "/info", timeout=5) as r:
            in_flight = sum(w.get("in_flight", 0) for w in json.load(r)["workers"])
        if in_flight == 0:
            break
        assert time.monotonic() < deadline, f"{in_flight} request(s) still in flight 30 s after cancel"
        time.sleep(0.2)
