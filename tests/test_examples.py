"""The bundled example images: every file has a stated source and licence, and the real
photographs load as uploads do, in several aspect ratios and sizes, small on disk."""

from __future__ import annotations

from utils.image_utils import EXAMPLES_DIR, load_image

LICENSES = EXAMPLES_DIR / "LICENSES.md"
PHOTOS = sorted(EXAMPLES_DIR.glob("photo_*.jpg"))


def test_every_example_is_named_in_the_licences_file():
    listed = LICENSES.read_text(encoding="utf-8")
    images = [path for path in EXAMPLES_DIR.iterdir() if path.name != LICENSES.name]
    assert images
    unlisted = [path.name for path in images if path.name.startswith("photo_") and f"`{path.name}`" not in listed]
    assert not unlisted, f"photos without a stated source and licence: {unlisted}"
    assert all(path.name.startswith(("photo_", "scene_")) for path in images)
    assert "`scene_*.png`" in listed and "scripts/make_examples.py" in listed


def test_photos_load_as_uploads_do_in_several_shapes_and_stay_small():
    assert 3 <= len(PHOTOS) <= 5
    sizes = [load_image(path.read_bytes()).size for path in PHOTOS]
    assert all(path.stat().st_size <= 300_000 for path in PHOTOS)
    assert any(width > height for width, height in sizes)
    assert any(width < height for width, height in sizes)  # a portrait one
    assert any(width == height for width, height in sizes)
    assert len({round(width / height, 2) for width, height in sizes}) >= 3
    assert max(width * height for width, height in sizes) >= 4 * min(width * height for width, height in sizes)
