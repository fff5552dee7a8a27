"""Safe image loading, heatmap overlays with matplotlib colour maps, and drawing helpers.

Every function here is pure: it returns a new image or array and never modifies its inputs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

# 50 megapixels (150 MB as RGB) holds nearly every camera photo; beyond it, refuse early.
DEFAULT_MAX_PIXELS = 50_000_000
# The page works on a copy of each upload no larger than this: over 5x the largest input of
# the models here (BLIP 384, CLIP 224 pixels), so the models' own resize from it gives what it
# gives from the original up to the last rounding, at 12 MB instead of up to 150 MB as RGB.
WORKING_MAX_SIDE = 2048
# EXIF orientations that turn the picture by 90 degrees (width and height swap).
QUARTER_TURN_ORIENTATIONS = (5, 6, 7, 8)

# Pillow names camera JPEGs that carry a second picture "MPO"; they are JPEGs to the user.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF")
ACCEPTED_FORMATS_TEXT = "JPEG, PNG, WebP, BMP or GIF"
# Magic bytes of JPEG, PNG, GIF and BMP (WebP is checked apart: RIFF....WEBP).
ACCEPTED_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")

COLORMAP_NAMES = ("jet", "inferno", "viridis", "magma", "turbo", "gray")
COLOUR_TABLE_SIZE = 256  # matplotlib's own resolution for these maps

# Modes a resize treats as colours (palette and 16-bit images are converted first).
RESIZABLE_MODES = ("RGB", "RGBA", "L", "LA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

# Pixels the model did not see: the photo dimmed to grey, crossed by light diagonal lines.
UNCOVERED_DIM_FACTOR = 0.45
UNCOVERED_HATCH_VALUE = 200

NOT_AN_IMAGE_MESSAGE = (
    f"This file is not an image Pillow can read. Please upload a {ACCEPTED_FORMATS_TEXT} image."
)
CORRUPT_MESSAGE = "The image is truncated or corrupt."


class ImageLoadError(ValueError):
    """An uploaded file cannot be used as an image; the message is meant for the user."""


@dataclass(frozen=True)
class WorkingImage:
    """An upload decoded once, as the page keeps it: an upright RGB copy no larger than the
    models need, the original's upright size, and the sha256 of the file's bytes (its key)."""

    image: Image.Image
    original_size: tuple[int, int]
    sha256: str

    def original_box(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """A box (x0, y0, x1, y1) in working-copy pixels as pixels of the original image."""
        scale_x = self.original_size[0] / self.image.width
        scale_y = self.original_size[1] / self.image.height
        x0, y0, x1, y1 = box
        return round(x0 * scale_x), round(y0 * scale_y), round(x1 * scale_x), round(y1 * scale_y)


def load_working_image(data: bytes, *, max_side: int = WORKING_MAX_SIDE) -> WorkingImage:
    """Decode an upload once into the copy the page works on (see ``load_image``)."""
    image, original_size = _decode(data, DEFAULT_MAX_PIXELS, max_side)
    return WorkingImage(image, original_size, hashlib.sha256(data).hexdigest())


def load_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an uploaded file into an upright RGB image fully loaded in memory.

    Args:
        data: the file's bytes; the format is read from the content, never from a file name.
        max_pixels: largest accepted width * height, checked from the header before decoding.
            Pillow itself refuses anything above 2 * Image.MAX_IMAGE_PIXELS whatever this says.

    Returns:
        A new RGB image: EXIF orientation applied, transparency composited on white,
        16-bit greys rescaled to 8 bits, animations reduced to their first frame.

    Raises:
        ImageLoadError: for every unreadable, unsupported, corrupt or oversized file.
    """
    return _decode(data, max_pixels, max_side=None)[0]


def _decode(data: bytes, max_pixels: int, max_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """``load_image``, shrunk to ``max_side`` when given (a JPEG is decoded at the smallest of
    its built-in scales, 1/2 to 1/8, that is still large enough), and the original's upright size."""
    if not data:
        raise ImageLoadError("The file is empty.")
    # A file that starts like an accepted format but does not open is damaged, not foreign.
    open_failure = CORRUPT_MESSAGE if _has_accepted_signature(data) else NOT_AN_IMAGE_MESSAGE
    with _pillow_errors(max_pixels, failure_message=open_failure):
        image = Image.open(io.BytesIO(data))
    with image:
        _check_format(image.format)
        _check_pixel_count(image.size, max_pixels)
        with _pillow_errors(max_pixels, failure_message=CORRUPT_MESSAGE):
            width, height = image.size
            quarter_turn = image.getexif().get(0x0112, 1) in QUARTER_TURN_ORIENTATIONS
            original_size = (height, width) if quarter_turn else (width, height)
            if max_side is not None and image.format in ("JPEG", "MPO"):
                image.draft("RGB", (max_side, max_side))
            # Truncated JPEGs open fine and only fail here, so load() stays inside the guard.
            image.load()
            if max_side is not None and image.mode in RESIZABLE_MODES:
                # Before the copies below (12 MB, not 150), and averaging whole blocks of pixels
                # first: its intermediate images stay small while the full decode is still held.
                image = fit_for_display(image, max_side, reducing_gap=1.0)
            upright = _to_rgb(ImageOps.exif_transpose(image))
            return (upright if max_side is None else fit_for_display(upright, max_side)), original_size


@contextmanager
def _pillow_errors(max_pixels: int, *, failure_message: str) -> Iterator[None]:
    """Turn any exception raised by Pillow inside the block into one ImageLoadError."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # The warning is an exception only when warnings are set to "error"; same meaning.
        raise ImageLoadError(_too_large_message(_pixel_count_from(error), max_pixels)) from error
    except MemoryError as error:
        raise ImageLoadError("The image is too large to decode in memory.") from error
    # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError,
    # ZeroDivisionError and more on hostile files: the user needs one message for all.
    except Exception as error:
        raise ImageLoadError(failure_message) from error


def _has_accepted_signature(data: bytes) -> bool:
    """Tell whether data starts with the magic bytes of an accepted format."""
    is_webp = data.startswith(b"RIFF") and data[8:12] == b"WEBP"
    return is_webp or data.startswith(ACCEPTED_SIGNATURES)


def _pixel_count_from(error: Exception) -> int | None:
    """Read the pixel count from Pillow's decompression-bomb message, if it is there."""
    match = re.search(r"\((\d+) pixels\)", str(error))
    return int(match.group(1)) if match else None


def _too_large_message(pixel_count: int | None, max_pixels: int) -> str:
    """Say how large the image is and what the limit is, in megapixels."""
    limit = f"the limit is {max_pixels / 1e6:g}"
    if pixel_count is None:
        return f"The image is too large ({limit} megapixels)."
    return f"The image is too large ({pixel_count / 1e6:.1f} megapixels; {limit})."


def _check_format(image_format: str | None) -> None:
    """Refuse formats other than the accepted ones, naming what the file is."""
    if image_format not in ACCEPTED_FORMATS:
        raise ImageLoadError(
            f"{image_format} images are not supported. "
            f"Please upload a {ACCEPTED_FORMATS_TEXT} image."
        )


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an image whose header claims more pixels than max_pixels, before decoding it."""
    width, height = size
    if width * height > max_pixels:
        raise ImageLoadError(_too_large_message(width * height, max_pixels))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to RGB with the colours a viewer would show."""
    if image.mode in SIXTEEN_BIT_MODES:
        # A plain convert clips values above 255 and turns 16-bit greys nearly white.
        image = _sixteen_bit_to_grey(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # CMYK JPEGs: Pillow reads them with Adobe's inverted polarity, which is what encoders write.
    return image.convert("RGB")


def _sixteen_bit_to_grey(image: Image.Image) -> Image.Image:
    """Rescale a 16-bit (or 32-bit integer) grey image from 0..65535 to an 8-bit L image."""
    values = np.clip(np.asarray(image).astype(np.float64), 0, 65535)
    return Image.fromarray(np.round(values / 257.0).astype(np.uint8))  # (H, W) uint8 -> L


def fit_for_display(image: Image.Image, max_side: int, reducing_gap: float = 3.0) -> Image.Image:
    """Downscale an image so that its longer side is at most max_side, keeping the aspect.

    Args:
        image: any PIL image; returned as it is (same object) when already small enough.
        max_side: largest allowed width or height in pixels, >= 1.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}.")
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap shrinks by whole factors first: fast on 24-megapixel photos, same quality.
    return image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=reducing_gap)


def colormap_names() -> list[str]:
    """Return the colour maps offered in the UI, most familiar first."""
    return list(COLORMAP_NAMES)


def colorize(heat: np.ndarray, colormap: str, vmin: float, vmax: float) -> np.ndarray:
    """Map heat values to colours, vmin to the bottom and vmax to the top of the colour map.

    Args:
        heat: (H, W) float; values outside [vmin, vmax] are clipped, NaN comes out black.
        colormap: one of colormap_names().
        vmin, vmax: the value range of the colour scale, vmin <= vmax; equal means flat.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    _check_colormap(colormap)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heat must be a 2-D (H, W) array, got shape {heat.shape}.")
    if not (np.isfinite(vmin) and np.isfinite(vmax) and vmin <= vmax):
        raise ValueError(f"Need finite vmin <= vmax, got vmin={vmin}, vmax={vmax}.")
    span = vmax - vmin if vmax > vmin else 1.0
    normalised = (heat - vmin) / np.float32(span)  # (H, W) float32
    np.clip(normalised, 0.0, 1.0, out=normalised)
    not_a_number = np.isnan(heat)
    normalised[not_a_number] = 0.0
    # A 256-entry table indexed as matplotlib does (floor(x * N)), without its float64 copies.
    table = matplotlib.colormaps[colormap](np.linspace(0.0, 1.0, COLOUR_TABLE_SIZE), bytes=True)
    indices = np.minimum(normalised * COLOUR_TABLE_SIZE, COLOUR_TABLE_SIZE - 1).astype(np.uint8)
    rgb = table[indices, :3]  # (H, W, 3) uint8
    rgb[not_a_number] = 0
    return rgb


def _check_colormap(colormap: str) -> None:
    """Refuse a colour map that is not in the curated list."""
    if colormap not in COLORMAP_NAMES:
        choices = ", ".join(COLORMAP_NAMES)
        raise ValueError(f"Unknown colormap {colormap!r}; choose one of {choices}.")


def overlay_heatmap(
    image: Image.Image,
    heat_image: np.ndarray,
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
    value_range: tuple[float, float] | None = None,
) -> Image.Image:
    """Blend a colour-mapped heatmap over an image; NaN pixels are shown as not covered.

    Args:
        image: RGB image of size (W, H).
        heat_image: (H, W) float in image pixels; NaN marks pixels the model never saw
            (CLIP's centre crop leaves margins), drawn dimmed grey with diagonal hatching.
        alpha: weight of the heatmap colour in [0, 1]; 0 shows only the image.
        colormap: one of colormap_names().
        value_range: (vmin, vmax) of the colour scale, shared by several maps; None
            stretches this map's own finite minimum..maximum.

    Returns:
        A new RGB image of size (W, H).
    """
    _check_rgb(image)
    _check_colormap(colormap)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    heat = np.asarray(heat_image, dtype=np.float32)
    if heat.shape != (image.height, image.width):
        raise ValueError(
            f"heat_image shape {heat.shape} does not match the image (H, W) "
            f"= {(image.height, image.width)}."
        )
    if np.isinf(heat).any():
        raise ValueError("heat_image contains infinite values; use NaN for uncovered pixels.")
    vmin, vmax = value_range if value_range is not None else finite_range(heat)
    pixels = np.asarray(image)  # (H, W, 3) uint8
    colours = colorize(heat, colormap, vmin, vmax)  # (H, W, 3) uint8
    # In-place float32 steps keep a 24-megapixel overlay to a few hundred MB.
    blended = pixels.astype(np.float32)
    blended *= np.float32(1.0 - alpha)
    blended += colours * np.float32(alpha)
    uncovered = np.isnan(heat)  # (H, W) bool
    if uncovered.any():
        blended[uncovered] = _hatched_grey(pixels, uncovered)
    np.round(blended, out=blended)
    return Image.fromarray(blended.astype(np.uint8))  # (H, W, 3) uint8 -> RGB


def finite_range(heat: np.ndarray) -> tuple[float, float]:
    """Return (min, max) over the finite values of heat, any shape, or (0, 1) if none.

    Pass it the stacked maps of several layers to get one shared value_range.
    """
    heat = np.asarray(heat)
    finite = heat[np.isfinite(heat)]
    if finite.size == 0:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())


def _hatched_grey(pixels: np.ndarray, uncovered: np.ndarray) -> np.ndarray:
    """Return the uncovered pixels dimmed to grey and crossed by diagonal lines, as (N, 3).

    Args:
        pixels: (H, W, 3) uint8 image.
        uncovered: (H, W) bool, True at the N pixels to draw as "not covered".
    """
    height, width = uncovered.shape
    rows, columns = np.nonzero(uncovered)  # (N,) each: only uncovered pixels cost memory
    grey = pixels[rows, columns].mean(axis=1, dtype=np.float32)  # (N,)
    grey *= np.float32(UNCOVERED_DIM_FACTOR)
    # Line spacing follows the image size so the hatching looks alike at any resolution.
    spacing = max(6, min(height, width) // 30)
    on_hatch_line = (rows + columns) % spacing < max(1, spacing // 4)
    grey[on_hatch_line] = UNCOVERED_HATCH_VALUE
    return np.repeat(grey[:, None], 3, axis=1)


def _check_rgb(image: Image.Image) -> None:
    """Refuse images that are not RGB, so colours and blending mean the same everywhere."""
    if image.mode != "RGB":
        raise ValueError(f"Expected an RGB image, got mode {image.mode!r}.")


def draw_grid(
    image: Image.Image,
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    colour: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Draw thin half-transparent vertical lines at xs and horizontal lines at ys.

    Args:
        image: RGB image.
        xs: x positions of vertical lines in image pixels.
        ys: y positions of horizontal lines in image pixels.
        colour: RGB of the lines, drawn at 50% opacity.
    """
    _check_rgb(image)
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    line_width = _stroke_width(image.size)
    line_colour = (*colour, 128)
    for x in xs:
        draw.line([(x, 0), (x, image.height - 1)], fill=line_colour, width=line_width)
    for y in ys:
        draw.line([(0, y), (image.width - 1, y)], fill=line_colour, width=line_width)
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def draw_box(
    image: Image.Image,
    box: tuple[int, int, int, int],
    colour: tuple[int, int, int],
    width: int,
) -> Image.Image:
    """Draw the outline of a rectangle.

    Args:
        image: RGB image.
        box: (left, top, right, bottom) in image pixels, right and bottom exclusive.
        colour: RGB of the outline.
        width: outline width in pixels, >= 1, drawn inside the box.
    """
    _check_rgb(image)
    left, top, right, bottom = box
    if right <= left or bottom <= top:
        raise ValueError(f"box must be (left, top, right, bottom) with right > left and "
                         f"bottom > top, got {box}.")
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}.")
    result = image.copy()
    ImageDraw.Draw(result).rectangle(
        [left, top, right - 1, bottom - 1], outline=tuple(colour), width=width
    )
    return result


def draw_marker(
    image: Image.Image, point: tuple[int, int], colour: tuple[int, int, int]
) -> Image.Image:
    """Draw a circle with a cross at point, sized to the image and outlined in black.

    Args:
        image: RGB image.
        point: (x, y) in image pixels.
        colour: RGB of the marker.
    """
    _check_rgb(image)
    x, y = point
    radius = max(5, round(min(image.size) * 0.03))
    stroke = _stroke_width(image.size) + 1
    result = image.copy()
    draw = ImageDraw.Draw(result)
    # A black stroke under the coloured one keeps the marker visible on any background.
    for fill, width in (((0, 0, 0), stroke + 2), (tuple(colour), stroke)):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=fill, width=width)
        draw.line([(x - radius, y), (x + radius, y)], fill=fill, width=width)
        draw.line([(x, y - radius), (x, y + radius)], fill=fill, width=width)
    return result


def _stroke_width(size: tuple[int, int]) -> int:
    """Return a line width that reads as thin at any image size: 1 px per 500 px of side."""
    return max(1, round(max(size) / 500))


def to_png_bytes(image: Image.Image) -> bytes:
    """Encode an image as PNG bytes (for downloads and st.image)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# The bundled example images (photos and shapes scenes), for the app's picker and the "others"
# counterfactual.
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "media" / "examples"
EXAMPLE_PATTERNS = ("scene_*.png", "photo_*.jpg")

# What stands for "no image" in a word's visual reliance: a set of images whose mean probability
# of the word is its prior. "others" (the default): the example images other than this one, so
# the prior is what the model says of a typical image, an estimate of p(word | prefix) as the
# expectation over images; the reliance is then the pointwise mutual information of word and
# image. Measured on the shapes demos' ground truth, it tells object words from "a" and "and"
# best (README). The single images each carry something of their own: "mean", the
# normalisation mean everywhere, which the processor turns into all zeros (the usual
# attribution baseline, but the flat image is read as something, the inside of a square on the
# shapes demo); "blurred" keeps coarse colour blobs (a red blob still says "red"); "noise" is
# out of distribution and adds random evidence.
COUNTERFACTUALS = ("others", "mean", "blurred", "noise")
COUNTERFACTUAL_NAMES = {  # how the page names each kind after "log p given the"
    "others": "other example images (their mean probability)",
    "mean": "mean image",
    "blurred": "blurred image",
    "noise": "noise image",
}


def example_names() -> list[str]:
    """File names of the bundled example images, in name order."""
    return sorted(path.name for pattern in EXAMPLE_PATTERNS for path in EXAMPLES_DIR.glob(pattern))


@functools.cache
def example_images() -> tuple[Image.Image, ...]:
    """The bundled example images, decoded once (RGB); callers must not modify them."""
    images = []
    for name in example_names():
        with Image.open(EXAMPLES_DIR / name) as example:
            images.append(example.convert("RGB"))
    return tuple(images)


def counterfactual_images(image: Image.Image, kind: str, mean_rgb: Sequence[float]) -> list[Image.Image]:
    """Images of ``image``'s size that stand for "no image": ``kind`` is one of COUNTERFACTUALS,
    ``mean_rgb`` the model's normalisation mean (0..1 per channel). The same every time."""
    if kind == "others":
        rgb = image.convert("RGB")
        return [
            example.resize(image.size, Image.Resampling.BICUBIC)
            for example in example_images()
            if example.size != rgb.size or example.tobytes() != rgb.tobytes()  # never the image itself
        ]
    if kind == "mean":
        return [Image.new("RGB", image.size, tuple(round(255 * value) for value in mean_rgb))]
    if kind == "blurred":
        return [image.convert("RGB").filter(ImageFilter.GaussianBlur(radius=max(image.size) / 8))]
    if kind == "noise":
        pixels = np.random.default_rng(0).integers(0, 256, (image.height, image.width, 3), dtype=np.uint8)
        return [Image.fromarray(pixels)]
    raise ValueError(f"unknown counterfactual {kind!r}; choose one of {', '.join(COUNTERFACTUALS)}")
