"""report.html in a real headless Chromium (Debian's chromium and chromedriver, which .ci/run installs): the page
loads from disk with no console error, shows one chip per word, a slider changes the pixels, and the value under
the cursor is the planted one."""

import os
import shutil

import numpy as np
import pytest

from diffprobe.report import write_report


@pytest.fixture(scope="module")
def browser():
    found = shutil.which("chromium") and shutil.which("chromedriver")
    if not found:
        if os.environ.get("DIFFPROBE_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required here (.ci/run installs them)")
        pytest.skip("no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


PIXELS = ("const c = document.getElementById('view'); const a = c.getContext('2d').getImageData(0, 0, c.width, "
          "c.height).data; let s = 0; for (let i = 0; i < a.length; i += 4) s += (a[i] * 3 + a[i + 1] * 5 + a[i + 2]) "
          "* (i % 9973); return s;")   # weighted by position: a moved map changes it


def _slide(driver, which: str, value: int) -> None:
    driver.execute_script(f"const e = document.getElementById('{which}'); e.value = {value}; "
                          "e.dispatchEvent(new Event('input'));")


def test_the_page_loads_shows_every_word_and_its_controls_change_the_view(browser, tmp_path):
    h = w = 8
    image = np.full((64, 64, 3), 128, np.uint8)
    maps = np.zeros((3, h, w), np.float32)
    maps[0, 2, 5], maps[1, 6, 1], maps[2] = 2.0, 0.5, 0.25          # word 0 peaks at (x 5, y 2)
    other = maps[:, ::-1, ::-1].copy()
    slices = {(0, 0): maps, (1, 0): other, (0, 1): maps * 3, (0, 2): other}
    labels = np.zeros((64, 64), np.int64)
    labels[32:] = 1
    path = write_report(tmp_path / "report.html", "a red </script> cat", image, ["a", "red", "cat"], slices,
                        ["all layers", "layer 1"], ["all steps", "call 0", "call 1"], labels=labels,
                        boxes=[{"label": "cat", "box": [4, 4, 40, 40]}])
    text = path.read_text()
    assert "http" not in text.replace("http://www.w3.org", "").replace("https://html.spec", "")  # nothing fetched
    browser.get(path.as_uri())
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.getElementById('view').width") == 512)
    assert browser.execute_script("return document.querySelectorAll('#chips button').length") == 3
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    base = browser.execute_script(PIXELS)
    _slide(browser, "layer", 1)
    assert browser.execute_script(PIXELS) != base                    # another layer's map
    _slide(browser, "layer", 0)
    assert browser.execute_script(PIXELS) == base
    _slide(browser, "opacity", 0)
    assert browser.execute_script(PIXELS) != base                    # the overlay's opacity
    _slide(browser, "opacity", 60)
    # the cursor over cell (x 5, y 2) of word 0 reads the planted 2.0
    browser.execute_script("const c = document.getElementById('view'), r = c.getBoundingClientRect();"
                           "c.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + r.width * 5.5 / 8,"
                           " clientY: r.top + r.height * 2.5 / 8}));")
    shown = browser.find_element("id", "value").text
    assert "x 5" in shown and "y 2" in shown and "value 2.000" in shown
    browser.execute_script("document.querySelectorAll('#chips button')[2].click()")
    assert browser.execute_script(PIXELS) != base                    # another word
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


@pytest.mark.parametrize("task", ["localize", "diffseg", "probe"])
def test_every_image_task_writes_a_page_that_loads(browser, task, tmp_path):
    """task=localize (a chip per word, refined and raw layers, its boxes), diffseg (a chip per segment, its
    segments) and probe (a chip per token of its cross-attention sites) on mini's demo scene: each page loads with
    no console error and draws."""
    import importlib
    import json

    from config_helpers import make_cfg
    from selenium.webdriver.support.ui import WebDriverWait

    module = importlib.import_module(f"diffprobe.tasks.{task}")
    module.run(make_cfg(task, model="mini"), tmp_path)
    page = tmp_path / "demo_scene" / "report.html"
    browser.get(page.as_uri())
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.getElementById('view').width") > 300)
    chips = browser.execute_script("return document.querySelectorAll('#chips button').length")
    if task == "localize":
        assert chips == len(json.loads((tmp_path / "demo_scene" / "localization.json").read_text())["words"])
        assert browser.execute_script("return D.layers.length") == 2 and browser.execute_script("return D.boxes.length")
    elif task == "diffseg":
        assert chips == json.loads((tmp_path / "demo_scene" / "segments.json").read_text())["num_segments"]
        assert browser.execute_script("return D.labels !== null")
    else:
        assert chips > 1
    assert browser.execute_script(PIXELS) > 0
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
