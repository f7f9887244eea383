"""A screenshot of the web app (``assets/app.png``), taken in headless Chromium once the page has
loaded a model, pruned it and measured it.

    python demos/screenshot_app.py                                   # the app's default model
    python demos/screenshot_app.py --model whisper-tiny.en --target qk --mode global --ratio 0.25 --out assets/app.png

Drives the system Chromium (``apt-get install chromium``) through Playwright; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: app.py is at the root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_results(page, text: str, timeout_s: float) -> None:
    """Until the results table (not the progress text drawn over it) mentions ``text``."""
    page.wait_for_function(
        "(t) => document.querySelector('#results [data-testid=markdown]').innerText.includes(t)",
        arg=text,
        timeout=timeout_s * 1000,
    )


TARGET_LABEL = {"qk": "Q-K", "vo": "V-O", "both": "both"}
PRUNED = {"qk": "Q-K pruned", "vo": "V-O pruned", "both": "Q-K and V-O pruned"}  # as the results title says


def shoot(
    url: str, out: Path, target: str | None, mode: str, ratio: float | None, width: int, timeout_s: float
) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("error: no chromium on PATH; install it with apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 1200}, device_scale_factor=1)
        page.goto(url)
        page.wait_for_selector("#results table", timeout=timeout_s * 1000)
        if target is not None:
            page.get_by_test_id(f"{TARGET_LABEL[target]}-radio-label").click()
            wait_for_results(page, PRUNED[target], timeout_s)
        if mode != "uniform":
            page.get_by_text("global: one threshold").click()
            wait_for_results(page, f"{mode}, ratio", timeout_s)
        if ratio is not None:
            box = page.locator("#ratio input[type=number]")
            box.fill(f"{ratio:g}")
            box.press("Tab")  # leaving the box releases the slider: the page prunes and measures again
            wait_for_results(page, f"{mode}, ratio {ratio:g}", timeout_s)
        page.mouse.move(0, 0)  # no hover styling in the picture
        page.wait_for_timeout(1500)  # let Plotly finish drawing
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="the model the page opens with (default: the app's default)")
    p.add_argument(
        "--target", choices=list(TARGET_LABEL), default=None, help="the pair to prune (default: the app's default)"
    )
    p.add_argument("--mode", choices=["uniform", "global"], default="uniform")
    p.add_argument("--ratio", type=float, default=None, help="move the ratio slider here before the shot")
    p.add_argument("--out", type=Path, default=Path("assets/app.png"))
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the page's results")
    args = p.parse_args()
    if args.model:
        os.environ["CLOVER_DEFAULT_MODEL"] = args.model
    import app

    demo = app.build_demo()
    demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True, **app.launch_options()
    )
    try:
        shoot(demo.local_url, args.out, args.target, args.mode, args.ratio, args.width, args.timeout)
    finally:
        demo.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
