"""Large photos in the app: decoded once, kept small, refused in words, memory bounded."""

from __future__ import annotations

import html
import io
import re

import pytest
from PIL import Image
from streamlit.runtime.caching.cache_data_api import _data_caches

import utils.image_utils
from app import DISPLAY_MAX_SIDE
from tests.app_helpers import click, resident_mb, start_app, upload
from utils.image_utils import WORKING_MAX_SIDE
from utils.shapes_world import generate_scene

SIDE = 7000  # 49 megapixels, under the 50 MP cap


def large_png(seed: int) -> bytes:
    """A 49 MP PNG of a shapes scene (about 0.2 MB on disk, 147 MB as decoded RGB)."""
    scene = generate_scene(seed)
    buffer = io.BytesIO()
    scene.image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.NEAREST).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_limits_are_told_before_an_upload_and_a_file_over_them_is_refused_in_words():
    app = start_app()
    assert any("Up to 20 MB and 50 megapixels" in caption.value for caption in app.caption)
    upload(app, "huge.jpg", b"\xff\xd8\xff" + bytes(21 << 20))
    assert not app.exception
    (error,) = app.error
    shown = html.unescape(error.value)  # as the page shows it
    assert "huge.jpg: The file is 21.0 MB, over the 20 MB limit." in shown


def test_an_upload_is_decoded_once_however_often_the_page_reruns(monkeypatch):
    decoded = []
    load = utils.image_utils.load_working_image

    def counting_load(data, **options):
        decoded.append(len(data))
        return load(data, **options)

    monkeypatch.setattr(utils.image_utils, "load_working_image", counting_load)
    app = upload(start_app(), "large.png", large_png(99999))
    for opacity in (0.3, 0.6, 0.9):
        app.slider(key="opacity").set_value(opacity).run()
    assert not app.exception, app.exception
    assert len(decoded) == 1


def test_a_large_photo_costs_bounded_memory_and_the_session_keeps_no_full_size_copy():
    """A generous bound (bench/memory.py holds the tight numbers, against a real browser)."""
    app = upload(start_app(), "warm-up.png", large_png(99998))  # allocator, models and caches
    before = resident_mb()
    for seed in (99999, 99997, 99996):
        upload(app, f"{seed}.png", large_png(seed))
        click(app, 100, 100, SIDE, unix_time=seed)
        click(app, 3000, 3000, SIDE, unix_time=seed + 0.5)
        app.button(key="regenerate").click().run()
        assert not app.exception, app.exception
        corners = [int(number) for number in re.findall(r"\d+", app.session_state["region"][0])]
        # In original pixels, to within one displayed pixel (7000 / 420 = 17 original pixels).
        assert corners == pytest.approx([100, 100, 3000, 3000], abs=17)
    working = app.session_state["working"]
    assert max(working.image.size) == WORKING_MAX_SIDE and working.original_size == (SIDE, SIDE)
    assert max(app.session_state["display_image"].size) == DISPLAY_MAX_SIDE
    # Streamlit's caches are bounded by entry count only: none may hold image-sized data.
    cached = [stat for stats in _data_caches.get_stats().values() for stat in stats]
    assert cached and max(stat.byte_length for stat in cached) < 1 << 20
    growth = resident_mb() - before
    print(f"resident memory growth over three 49 MP photos: {growth:.0f} MB")
    assert growth <= 600


def test_a_box_on_the_working_copy_is_told_in_the_original_photos_pixels():
    app = upload(start_app(), "large.png", large_png(99999))
    click(app, 0, 0, SIDE, unix_time=1.0)
    click(app, SIDE - 1, SIDE - 1, SIDE, unix_time=2.0)
    description, (box,) = app.session_state["region"]
    assert (box.x0, box.y0, box.x1, box.y1) == (0, 0, WORKING_MAX_SIDE, WORKING_MAX_SIDE)
    assert description == f"rectangle (0, 0) → ({SIDE}, {SIDE})"
