"""The reports in a real browser: Debian's Chromium, headless, loads them from disk, shows every image and
renders a page that is not blank."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from rentrain.ledger import Ledger
from rentrain.report import write_queue_report
from tests.report.browser import Browser
from tests.report.builders import GRID_COLOURS, night_queue

IMAGES_LOADED = "Array.from(document.images, image => [image.complete, image.naturalWidth, image.naturalHeight])"


def shows_colour(screenshot: Image.Image, colour: tuple[int, int, int]) -> bool:
    return any(
        all(abs(a - b) <= 2 for a, b in zip(pixel, colour, strict=True)) for _, pixel in screenshot.getcolors(1 << 24)
    )


def test_the_queue_and_job_reports_render_with_every_image_loaded(tmp_path: Path) -> None:
    ledger = Ledger()
    night = night_queue(ledger, tmp_path)
    queue_report = write_queue_report(ledger, night.queue.id)
    job_report = night.first.output_dir / "report.html"
    with Browser(tmp_path / "browser") as browser:
        for page, images in ((queue_report, 2), (job_report, 2)):
            session = browser.open(page)
            loaded = browser.evaluate(session, IMAGES_LOADED)
            assert loaded == [[True, 320, 160]] * images, page
            screenshot = Image.open(io.BytesIO(browser.screenshot(session))).convert("RGB")
            screenshot.save(tmp_path / f"{page.parent.name}.png")  # to look at when this fails
            colours = screenshot.getcolors(1 << 24)
            assert len(colours) > 50, f"{page}: a nearly blank page ({len(colours)} colours)"
            white = max(count for count, pixel in colours if pixel == (255, 255, 255))
            assert white < 0.97 * screenshot.width * screenshot.height, f"{page}: nearly all white"
            assert all(shows_colour(screenshot, colour) for colour in GRID_COLOURS), f"{page}: the grids are not shown"
