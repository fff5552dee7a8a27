"""Server memory with large photos: `streamlit run app.py` driven by real Chromium.

Resident memory (VmRSS) of the server process is sampled every 0.1 s while a browser
session works through the page the way a user would:

- ``idle_mb``: after start-up and one small caption (a bundled scene).
- ``one_large_peak_mb``, ``one_large_s``: one 7000x7000 PNG (49 MP) through caption, a word's
  heatmap, a two-click region, mask and regenerate, and the layer video.
- ``one_megapixel_s``: the same flow on a 1000x1000 photo, for the ratio.
- ``ten_large_mb``: after ten distinct such 49 MP images in one session (each captioned,
  given a region and masked).
- ``after_close_mb``: 30 s after the tab closes.

    python bench/memory.py --json bench/results/memory.json
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

from utils.app_server import CHROMIUM_FLAGS, chromium_executable, running_app, wait_idle
from utils.shapes_world import generate_scene

LARGE_SIDE = 7000
MEGAPIXEL_SIDE = 1000
SMALL_SEED = 99999
AFTER_CLOSE_WAIT_S = 30


class MemorySampler:
    """The largest and the latest VmRSS of one process, sampled in a background thread."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        self.path = Path(f"/proc/{pid}/status")
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mb(self) -> float:
        for line in self.path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS in {self.path}")

    def reset_peak(self) -> None:
        self.peak_mb = self.now_mb()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self.now_mb())

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def scene_file(folder: Path, seed: int, side: int) -> Path:
    """A shapes scene upscaled to ``side`` x ``side`` pixels, saved as PNG."""
    image = generate_scene(seed).image.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
    path = folder / f"scene_{seed}_{side}.png"
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def upload(page, path: Path) -> None:
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))
    wait_idle(page)
    page.locator('[data-testid="stButtonGroup"]').first.wait_for()


def region_and_mask(page) -> None:
    """Click the second word, two corners of a box, and mask and regenerate."""
    page.locator('[data-testid="stButtonGroup"] button').nth(1).click()
    wait_idle(page)
    image = page.frame_locator('iframe[title*="streamlit_image_coordinates"]').locator("img")
    for corner in ({"x": 20, "y": 20}, {"x": 200, "y": 200}):
        image.click(position=corner)
        wait_idle(page)
    page.get_by_role("button", name="Mask and regenerate").click()
    wait_idle(page)
    page.get_by_text("After:").first.wait_for()


def full_flow(page, path: Path) -> float:
    """Seconds for caption, heatmap, region, mask and regenerate, and the video."""
    started = time.perf_counter()
    upload(page, path)
    region_and_mask(page)
    page.get_by_role("button", name="Build video").click()
    wait_idle(page)
    page.locator('[data-testid="stVideo"]').wait_for()
    return time.perf_counter() - started


def measure(folder: Path) -> dict:
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    if executable is None:
        raise SystemExit("Debian's chromium is not installed (make chromium)")
    small = scene_file(folder, SMALL_SEED, 128)
    megapixel = scene_file(folder, SMALL_SEED + 1, MEGAPIXEL_SIDE)
    large = [scene_file(folder, SMALL_SEED - index, LARGE_SIDE) for index in range(11)]
    with running_app() as (url, server), MemorySampler(server.pid) as memory, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1400, "height": 2400})
        page = context.new_page()
        page.goto(url)
        wait_idle(page)
        upload(page, small)
        idle_mb = memory.now_mb()
        one_megapixel_s = full_flow(page, megapixel)
        memory.reset_peak()
        one_large_s = full_flow(page, large[0])
        one_large_peak_mb = memory.peak_mb
        for path in large[1:]:
            upload(page, path)
            region_and_mask(page)
        ten_large_mb = memory.now_mb()
        context.close()
        time.sleep(AFTER_CLOSE_WAIT_S)
        after_close_mb = memory.now_mb()
        browser.close()
    return {
        "idle_mb": idle_mb,
        "one_large_peak_mb": one_large_peak_mb,
        "one_large_s": one_large_s,
        "one_megapixel_s": one_megapixel_s,
        "ten_large_mb": ten_large_mb,
        "after_close_mb": after_close_mb,
        "goals": {
            "one_large_peak_mb - idle_mb <= 300": one_large_peak_mb - idle_mb,
            "one_large_s / one_megapixel_s <= 2": one_large_s / one_megapixel_s,
            "ten_large_mb - idle_mb <= 600": ten_large_mb - idle_mb,
            "after_close_mb - idle_mb <= 150": after_close_mb - idle_mb,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = measure(Path(folder))
    for name, value in results.items():
        if name == "goals":
            for goal, measured in value.items():
                print(f"{goal:<40}{measured:>10.2f}")
        else:
            print(f"{name:<40}{value:>10.1f}")
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
