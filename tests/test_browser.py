"""End to end in a real headless browser: the page loads its default model, the user drags the
ratio slider, and the numbers and the plots follow.

Drives the system Chromium (Debian package ``chromium``; ``make setup`` installs it) through the
Playwright package; no browser is ever downloaded.
"""

import json
import shutil

import pytest

import app
from tests.conftest import launched_app

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 240_000  # a loaded 2-core machine; it takes seconds when idle
RESULTS = "#results [data-testid=markdown]"  # the table itself, not the progress text drawn over it


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with launched_app(tmp_path_factory.mktemp("scratch"), CLOVER_DEFAULT_MODEL="gpt2-tiny-random") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "no system chromium: install it with `sudo apt-get install chromium` (make test does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    yield page
    page.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def plot_state(page, elem_id: str) -> dict:
    """The Plotly figure the browser drew: its traces' hover data and its shapes."""
    return json.loads(
        page.evaluate(
            """(id) => { const el = document.querySelector(`#${id} .js-plotly-plot`);
                     return JSON.stringify({custom: el.data.map(t => t.customdata || null),
                                            shapes: (el.layout.shapes || []).map(s => [s.x0, s.x1, s.y0, s.y1])}); }""",
            elem_id,
        )
    )


def kv_cells(results: str) -> list[str]:
    """The KV-cache column of the results table, as the page shows it."""
    rows = [line.split("\t") for line in results.splitlines() if "\t" in line]
    return [row[2] for row in rows[1:]]


def test_slider_updates_the_numbers_and_the_plots(page):
    page.wait_for_selector("#results table", timeout=TIMEOUT_MS)
    page.wait_for_function("() => document.querySelector('#heatmap .js-plotly-plot')", timeout=TIMEOUT_MS)
    results = page.inner_text(RESULTS)
    assert app.DEFAULT_RATIO == 0.25 and "ratio 0.25" in results
    assert kv_cells(results) == ["8,192", "7,168 (-12.5%)", "7,168 (-12.5%)"]  # a quarter of V is gone (V-O first)
    heatmap, curves = plot_state(page, "heatmap"), plot_state(page, "curves")
    assert heatmap["custom"][1][0][0][0] == 48  # layer 0, head 0 keeps 48 of 64 V-O directions
    assert heatmap["custom"][0][0][0][0] == 64  # and all its Q-K directions

    slider = page.locator("#ratio input[type=range]")
    box = slider.bounding_box()
    page.mouse.click(box["x"] + 0.85 * box["width"], box["y"] + box["height"] / 2)  # press and release
    ratio = float(page.locator("#ratio input[type=number]").input_value())
    assert ratio > 0.5
    page.wait_for_function(
        "([sel, r]) => document.querySelector(sel).innerText.includes(`ratio ${r}`)",
        arg=[RESULTS, f"{ratio:g}"],
        timeout=TIMEOUT_MS,
    )
    kept = round(64 * (1 - ratio))
    after = kv_cells(page.inner_text(RESULTS))
    assert after[0] == "8,192" and after[1] == after[2] != "7,168 (-12.5%)"
    assert after[2].startswith(f"{4 * 256 * 4 + 4 * 4 * kept * 4:,} (")  # K of 4 layers + the kept V, fp32
    new_heatmap, new_curves = plot_state(page, "heatmap"), plot_state(page, "curves")
    assert new_heatmap["custom"][1][0][0][0] == kept
    assert new_curves["shapes"] != curves["shapes"] and new_curves["shapes"][0][0] == kept + 0.5


def test_small_generated_images_fill_their_boxes(browser, tmp_path):
    """The tiny UNet's 32 x 32 px images are scaled up to their boxes by the page's style (a browser
    shows an image at most at its own size), with the app's own launch options."""
    with launched_app(tmp_path, launch=app.launch_options(), CLOVER_DEFAULT_MODEL="sdxl-tiny-random") as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(url)
        page.wait_for_selector("#results table", timeout=TIMEOUT_MS)
        page.get_by_role("tab", name="Compare outputs").click()
        page.get_by_role("button", name="Generate images").click()
        images = page.locator(".clover-image img")
        page.wait_for_function(
            "() => { const imgs = [...document.querySelectorAll('.clover-image img')];"
            " return imgs.length === 3 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
            timeout=TIMEOUT_MS,
        )
        drawn = [images.nth(i).evaluate(DRAWN_HEIGHT) for i in range(3)]
        page.close()
    assert all(d["natural"] <= 64 for d in drawn)  # the images are small
    assert all(d["drawn"] >= 0.75 * app.IMAGE_HEIGHT and d["rendering"] == "pixelated" for d in drawn), drawn


# The height an <img> is drawn at inside its box: object-fit "contain" scales it to fit, "scale-down"
# (gradio's own) never above its natural size.
DRAWN_HEIGHT = """img => {
    const style = getComputedStyle(img), box = img.getBoundingClientRect();
    let scale = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
    if (style.objectFit === "scale-down" || style.objectFit === "none") scale = Math.min(scale, 1);
    return {natural: img.naturalHeight, drawn: img.naturalHeight * scale, rendering: style.imageRendering};
}"""
