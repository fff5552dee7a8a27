"""Tests for utils/image_utils.py: safe loading, overlays, colour maps and drawing helpers."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.bad_images import BadImageCase, bad_image_cases
from utils.image_utils import (
    ImageLoadError,
    colorize,
    colormap_names,
    draw_box,
    draw_grid,
    draw_marker,
    fit_for_display,
    load_image,
    overlay_heatmap,
    to_png_bytes,
)

# The warning-zone bomb makes Pillow warn on open; that warning is expected, not news.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

CASES = {case.name: case for case in bad_image_cases()}


def photo(width: int = 64, height: int = 48) -> Image.Image:
    """A deterministic RGB test image with a gradient, so every pixel differs."""
    columns = np.linspace(0, 255, width)[None, :]
    rows = np.linspace(0, 255, height)[:, None]
    pixels = np.stack(
        [np.broadcast_to(columns, (height, width)), np.broadcast_to(rows, (height, width)),
         np.full((height, width), 90.0)], axis=2)
    return Image.fromarray(pixels.astype(np.uint8))


def ramp_heat(width: int = 64, height: int = 48, top: float = 1.0) -> np.ndarray:
    """(H, W) float heat rising left to right from 0 to top."""
    return np.tile(np.linspace(0.0, top, width), (height, 1))


# Loading -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", bad_image_cases(), ids=lambda case: case.name)
def test_every_case_loads_correctly_or_fails_with_a_clear_message(case: BadImageCase) -> None:
    if case.expect_error:
        with pytest.raises(ImageLoadError) as raised:
            load_image(case.data)
        message = str(raised.value)
        assert case.message_contains in message.lower()
        assert message.endswith(".") and len(message) > 15
    else:
        image = load_image(case.data)
        assert image.mode == "RGB"
        case.check(image)


@pytest.mark.parametrize(
    "name", ["png_16bit_gradient", "exif_orientation_6", "rgba_png", "palette_gif_transparent"]
)
def test_case_checks_fail_on_naive_decoding(name: str) -> None:
    """Image.open(...).convert("RGB") gets these wrong, so the checks above can fail."""
    naive = Image.open(io.BytesIO(CASES[name].data)).convert("RGB")
    with pytest.raises(AssertionError):
        CASES[name].check(naive)


def test_truncated_load_leaves_pillow_strict() -> None:
    with pytest.raises(ImageLoadError):
        load_image(CASES["truncated_jpeg"].data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_bomb_warning_raised_as_error_still_maps_to_image_load_error() -> None:
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(CASES["bomb_in_pillow_warning_zone"].data)


def test_bomb_is_refused_from_its_header_alone() -> None:
    """The file holds 64 bytes of pixels: decoding it would report corruption, not size."""
    with pytest.raises(ImageLoadError, match=r"144\.0 megapixels; the limit is 50"):
        load_image(CASES["bomb_in_pillow_warning_zone"].data)


def test_max_pixels_is_per_call() -> None:
    data = to_png_bytes(photo(64, 48))
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(data, max_pixels=64 * 48 - 1)
    assert load_image(data, max_pixels=64 * 48).size == (64, 48)


def test_loaded_image_does_not_depend_on_the_input_buffer() -> None:
    data = bytearray(to_png_bytes(photo()))
    image = load_image(bytes(data))
    data[:] = b"\x00" * len(data)
    assert image.getpixel((63, 0)) == photo().getpixel((63, 0))


# Display size ------------------------------------------------------------------------------

def test_fit_for_display_downscales_keeping_aspect_without_touching_input() -> None:
    image = photo(400, 100)
    before = image.tobytes()
    small = fit_for_display(image, 100)
    assert small.size == (100, 25)
    assert image.size == (400, 100) and image.tobytes() == before


def test_fit_for_display_returns_small_image_itself_and_keeps_thin_images_visible() -> None:
    image = photo(50, 40)
    assert fit_for_display(image, 50) is image
    assert fit_for_display(Image.new("RGB", (1, 5000)), 500).size == (1, 500)
    with pytest.raises(ValueError, match="max_side"):
        fit_for_display(image, 0)


# Colour maps and overlays ------------------------------------------------------------------

def test_colormap_names_are_the_curated_list() -> None:
    assert colormap_names() == ["jet", "inferno", "viridis", "magma", "turbo", "gray"]


def test_colorize_maps_range_ends_to_colormap_ends_and_nan_to_black() -> None:
    heat = np.array([[-1.0, 2.0, 5.0, np.nan]])
    colours = colorize(heat, "viridis", vmin=0.0, vmax=2.0)
    assert colours.shape == (1, 4, 3) and colours.dtype == np.uint8
    bottom = np.array(matplotlib.colormaps["viridis"](0.0, bytes=True)[:3])
    top = np.array(matplotlib.colormaps["viridis"](1.0, bytes=True)[:3])
    np.testing.assert_array_equal(colours[0], [bottom, top, top, [0, 0, 0]])


def test_overlay_alpha_zero_is_the_image_and_alpha_one_is_the_colormap() -> None:
    image, heat = photo(), ramp_heat()
    assert overlay_heatmap(image, heat, alpha=0.0).tobytes() == image.tobytes()
    pure = np.asarray(overlay_heatmap(image, heat, alpha=1.0, colormap="gray"))
    np.testing.assert_array_equal(pure, colorize(heat, "gray", 0.0, 1.0))


def test_overlay_without_range_normalises_each_map_alone() -> None:
    image = photo()
    weak = overlay_heatmap(image, ramp_heat(top=0.5))
    strong = overlay_heatmap(image, ramp_heat(top=1.0))
    assert weak.tobytes() == strong.tobytes()


def test_overlay_with_shared_range_keeps_weak_maps_weak() -> None:
    image = photo()
    weak = np.asarray(overlay_heatmap(image, ramp_heat(top=0.5), alpha=1.0, colormap="gray",
                                      value_range=(0.0, 1.0)))
    strong = np.asarray(overlay_heatmap(image, ramp_heat(top=1.0), alpha=1.0, colormap="gray",
                                        value_range=(0.0, 1.0)))
    assert abs(int(weak[0, -1, 0]) - 128) <= 1  # 0.5 is mid-grey on the shared 0..1 scale
    assert strong[0, -1, 0] == 255


def test_uncovered_pixels_are_hatched_grey_not_low_attention() -> None:
    image, heat = photo(), ramp_heat()
    heat[:, :16] = np.nan  # the margin a centre crop never saw
    result = np.asarray(overlay_heatmap(image, heat, alpha=0.6, colormap="jet"))
    uncovered, covered = result[:, :16], result[:, 16:]
    assert (uncovered[..., 0] == uncovered[..., 2]).all()  # grey, no colour map colour
    assert len(np.unique(uncovered)) > 2  # dimmed photo plus hatch lines, not a flat fill
    lowest = np.asarray(overlay_heatmap(image, ramp_heat(), alpha=0.6, colormap="jet"))[:, :16]
    assert not np.array_equal(uncovered, lowest)
    assert not np.array_equal(uncovered, covered[:, :16])


def test_uncovered_pixels_do_not_depend_on_colormap_or_range() -> None:
    image, heat = photo(), ramp_heat()
    heat[:8] = np.nan
    first = np.asarray(overlay_heatmap(image, heat, colormap="jet"))[:8]
    second = np.asarray(overlay_heatmap(image, heat, colormap="magma", value_range=(-5, 5)))[:8]
    np.testing.assert_array_equal(first, second)


def test_all_nan_map_is_entirely_hatched() -> None:
    image = photo()
    result = np.asarray(overlay_heatmap(image, np.full((48, 64), np.nan)))
    assert (result[..., 0] == result[..., 1]).all()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"heat_image": np.zeros((48, 63))}, "does not match"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"colormap": "rainbow"}, "Unknown colormap"),
        ({"heat_image": np.full((48, 64), np.inf)}, "infinite"),
    ],
)
def test_overlay_rejects_bad_arguments(arguments: dict, message: str) -> None:
    call = {"heat_image": ramp_heat(), **arguments}
    with pytest.raises(ValueError, match=message):
        overlay_heatmap(photo(), **call)


def test_overlay_rejects_non_rgb_image_and_colorize_bad_ranges() -> None:
    with pytest.raises(ValueError, match="RGB"):
        overlay_heatmap(photo().convert("RGBA"), ramp_heat())
    with pytest.raises(ValueError, match="vmin"):
        colorize(ramp_heat(), "jet", 1.0, 0.0)
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros((2, 2, 2)), "jet", 0.0, 1.0)


# Drawing helpers and no side effects -------------------------------------------------------

def test_helpers_never_modify_their_inputs() -> None:
    image, heat = photo(), ramp_heat()
    heat[:4] = np.nan
    image_before, heat_before = image.tobytes(), heat.copy()
    overlay_heatmap(image, heat, value_range=(0.0, 2.0))
    draw_grid(image, [10, 20], [15])
    draw_box(image, (5, 5, 30, 30), (255, 0, 0), 2)
    draw_marker(image, (20, 20), (0, 255, 0))
    fit_for_display(image, 10)
    assert image.tobytes() == image_before
    np.testing.assert_array_equal(heat, heat_before)  # NaN positions compare equal here


def test_draw_grid_draws_half_transparent_lines_only_at_positions() -> None:
    image = Image.new("RGB", (50, 40), (0, 0, 0))
    result = np.asarray(draw_grid(image, [10], [20], colour=(255, 255, 255)))
    assert 100 < result[5, 10, 0] < 160  # 50% white over black
    assert 100 < result[20, 40, 0] < 160
    assert result[5, 30].tolist() == [0, 0, 0]


def test_draw_box_outlines_inside_the_box_only() -> None:
    image = Image.new("RGB", (40, 40), (0, 0, 0))
    result = np.asarray(draw_box(image, (10, 10, 30, 30), (255, 0, 0), 2))
    assert result[10, 20].tolist() == [255, 0, 0]
    assert result[29, 20].tolist() == [255, 0, 0]
    assert result[30, 20].tolist() == [0, 0, 0]  # right/bottom are exclusive
    assert result[20, 20].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="box"):
        draw_box(image, (30, 10, 10, 30), (255, 0, 0), 2)


def marker_extent(side: int) -> int:
    """Width in pixels of the marker drawn at the centre of a black side x side image."""
    marked = np.asarray(draw_marker(Image.new("RGB", (side, side)), (side // 2, side // 2),
                                    (0, 255, 0)))
    assert marked[side // 2, side // 2].tolist() == [0, 255, 0]
    columns = np.flatnonzero((marked[..., 1] > 0).any(axis=0))
    return int(columns[-1] - columns[0] + 1)


def test_draw_marker_scales_with_image_size() -> None:
    assert marker_extent(1500) >= 4 * marker_extent(300)


def test_to_png_bytes_round_trips() -> None:
    image = photo()
    assert load_image(to_png_bytes(image)).tobytes() == image.tobytes()
