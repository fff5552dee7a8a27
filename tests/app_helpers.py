"""Driving app.py in Streamlit's AppTest: start it, pick images, click regions, count model work."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

APP_PATH = str(Path(__file__).resolve().parents[1] / "app.py")
DISPLAY_WIDTH = 420  # app.DISPLAY_WIDTH: the click component reports clicks in these pixels


def start_app(timeout_s: float = 300) -> AppTest:
    """Run app.py once; the hub is switched off by conftest, so the demo is loaded."""
    app = AppTest.from_file(APP_PATH, default_timeout=timeout_s)
    app.run()
    return app


def pick_example(app: AppTest, name: str) -> AppTest:
    app.selectbox(key="example").set_value(name).run()
    return app


def upload(app: AppTest, name: str, data: bytes) -> AppTest:
    app.file_uploader[0].set_value((name, data, "application/octet-stream"))
    app.run()
    return app


def click(app: AppTest, x_image: float, y_image: float, image_width: int, unix_time: float) -> AppTest:
    """Click the region image at a point given in original image pixels.

    AppTest cannot click a custom component: set its value (in displayed pixels) as the
    browser would send it and rerun.
    """
    scale = DISPLAY_WIDTH / image_width
    app.session_state["region_clicks"] = {
        "x": round(x_image * scale), "y": round(y_image * scale),
        "width": DISPLAY_WIDTH, "height": DISPLAY_WIDTH, "unix_time": unix_time,
    }
    app.run()
    return app


def image_captions(app: AppTest) -> list[str]:
    """Captions of every st.image on the page (AppTest has no accessor for them)."""
    return [image.caption for element in app.get("image") for image in element.proto.imgs]


@contextmanager
def count_model_forwards() -> Iterator[list[int]]:
    """Count forward calls of every captioner (the demo is a BLIP) or CLIP module in this
    process while the block runs."""
    calls = [0]

    def hook(module, inputs, output):
        if type(module).__name__.startswith(("Blip", "CLIP")):
            calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def resident_mb() -> float:
    """This process's resident memory in MB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
