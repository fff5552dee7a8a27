"""A corpus of awkward uploads, built in memory, each with the outcome load_image must give.

Used by tests/test_image_utils.py and by app tests (upload each file, expect one clear message
or a correct picture). Build it with bad_image_cases(); each case is made from scratch, so no
binary files live in the repository.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
GREY = (128, 128, 128)

# JPEG and CMYK conversion round colours a little; 16-bit rescaling is exact to 1 level.
JPEG_TOLERANCE = 24
EXACT_TOLERANCE = 1

EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class BadImageCase:
    """One upload: its bytes, the name a user's file might have, and what must happen.

    check: for files that must load, a function that raises AssertionError unless the
        loaded RGB image is right (orientation, colours, size).
    message_contains: for files that must fail, a lower-case fragment of the message.
    """

    name: str
    data: bytes
    file_name: str
    expect_error: bool
    check: Callable[[Image.Image], None] | None = None
    message_contains: str = ""


@functools.cache
def bad_image_cases() -> tuple[BadImageCase, ...]:
    """Return every case, built once per process (the big JPEG takes a moment)."""
    return (
        BadImageCase("empty_file", b"", "empty.jpg", True, message_contains="empty"),
        BadImageCase("text_named_jpg", _text_bytes(), "holiday.jpg", True,
                     message_contains="not an image"),
        BadImageCase("truncated_jpeg", _truncated_jpeg(), "cut.jpg", True,
                     message_contains="truncated"),
        BadImageCase("png_bad_header_crc", _png_with_bad_header_crc(), "crc.png", True,
                     message_contains="corrupt"),
        BadImageCase("png_corrupt_pixel_data", _png_with_corrupt_pixel_data(), "zlib.png",
                     True, message_contains="corrupt"),
        # Pillow does not verify IDAT checksums: intact pixel data under a bad CRC loads.
        BadImageCase("png_bad_data_crc", _png_with_bad_data_crc(), "idat_crc.png", False,
                     check=_expect_uniform(RED, EXACT_TOLERANCE)),
        BadImageCase("tiny_1x1", _encode(Image.new("RGB", (1, 1), RED), "PNG"), "dot.png",
                     False, check=_expect_size_and_colour((1, 1), RED)),
        BadImageCase("thin_1x5000", _encode(Image.new("RGB", (1, 5000), BLUE), "PNG"),
                     "thin.png", False, check=_expect_size_and_colour((1, 5000), BLUE)),
        # 900 megapixels: above 2x Pillow's limit, so Pillow itself raises on open.
        BadImageCase("bomb_above_pillow_error", _png_header_claiming(30_000, 30_000),
                     "bomb.png", True, message_contains="too large"),
        # 144 megapixels: between 1x and 2x Pillow's limit, where Pillow only warns.
        BadImageCase("bomb_in_pillow_warning_zone", _png_header_claiming(12_000, 12_000),
                     "bomb2.png", True, message_contains="too large"),
        # 56 megapixels: under Pillow's limits, over load_image's default cap.
        BadImageCase("over_default_cap", _png_header_claiming(8_000, 7_000), "big.png", True,
                     message_contains="too large"),
        BadImageCase("huge_legal_jpeg", _encode(Image.new("RGB", (6000, 4000), GREEN), "JPEG"),
                     "camera.jpg", False, check=_expect_size_and_colour((6000, 4000), GREEN)),
        BadImageCase("cmyk_jpeg", _cmyk_jpeg(), "print.jpg", False, check=_check_quadrants),
        BadImageCase("rgba_png", _rgba_png(), "logo.png", False, check=_check_rgba_on_white),
        BadImageCase("palette_gif_transparent", _palette_gif(), "icon.gif", False,
                     check=_check_left_white_right_green),
        BadImageCase("animated_gif", _animated("GIF"), "anim.gif", False,
                     check=_expect_size_and_colour((20, 10), RED)),
        BadImageCase("animated_webp", _animated("WEBP"), "anim.webp", False,
                     check=_expect_size_and_colour((20, 10), RED)),
        BadImageCase("mpo_camera_jpeg", _mpo(), "phone.jpg", False,
                     check=_expect_size_and_colour((16, 16), RED, JPEG_TOLERANCE)),
        BadImageCase("png_16bit_gradient", _sixteen_bit_png(), "scan.png", False,
                     check=_check_sixteen_bit_gradient),
        BadImageCase("bmp_1bit", _encode(_one_bit_halves(), "BMP"), "mono.bmp", False,
                     check=_check_black_left_white_right),
        BadImageCase("exif_orientation_6", _exif_rotated_jpeg(6), "rot6.jpg", False,
                     check=_expect_red_corner("top_right")),
        BadImageCase("exif_orientation_8", _exif_rotated_jpeg(8), "rot8.jpg", False,
                     check=_expect_red_corner("bottom_left")),
        BadImageCase("tiff_refused", _encode(Image.new("RGB", (8, 8), RED), "TIFF"),
                     "scan.tif", True, message_contains="tiff"),
        BadImageCase("ico_refused", _encode(Image.new("RGB", (16, 16), RED), "ICO"),
                     "favicon.ico", True, message_contains="ico"),
        BadImageCase("pdf_refused", _encode(Image.new("RGB", (8, 8), RED), "PDF"),
                     "paper.pdf", True, message_contains="not an image"),
    )


def _encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    """Save an image to bytes in the given Pillow format."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _text_bytes() -> bytes:
    """A plain text file, as a user might upload by mistake under a .jpg name."""
    return b"Shopping list:\n- eggs\n- milk\n" * 4


def _noise_jpeg() -> bytes:
    """A 300x200 JPEG of seeded noise, so that half of it is real entropy-coded data."""
    rng = np.random.default_rng(0)
    return _encode(Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)), "JPEG")


def _truncated_jpeg() -> bytes:
    """The first half of a JPEG: the header opens fine, decoding fails."""
    data = _noise_jpeg()
    return data[: len(data) // 2]


def _png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    """Build one PNG chunk: length, type, payload, CRC32 of type + payload."""
    crc = zlib.crc32(chunk_type + payload)
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", crc)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A valid-looking 1-bit grey PNG whose header claims width x height; a few dozen bytes.

    Only the header is real: decoding it would allocate width * height / 8 bytes, so a
    loader must refuse it from its size alone.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _red_png() -> bytes:
    """A 10x10 red PNG to corrupt."""
    return _encode(Image.new("RGB", (10, 10), RED), "PNG")


def _flip_byte(data: bytes, index: int) -> bytes:
    """Return data with every bit of one byte inverted."""
    corrupted = bytearray(data)
    corrupted[index] ^= 0xFF
    return bytes(corrupted)


def _png_with_bad_header_crc() -> bytes:
    """A PNG whose IHDR checksum is wrong (Pillow checks it on open)."""
    ihdr_crc_offset = 8 + 8 + 13  # signature, IHDR length + type, IHDR payload
    return _flip_byte(_red_png(), ihdr_crc_offset)


def _idat_payload_offset(data: bytes) -> tuple[int, int]:
    """Return (offset, length) of the first IDAT payload in a PNG."""
    type_offset = data.index(b"IDAT")
    length = struct.unpack(">I", data[type_offset - 4 : type_offset])[0]
    return type_offset + 4, length


def _png_with_bad_data_crc() -> bytes:
    """A PNG whose IDAT checksum is wrong but whose pixel data is intact."""
    data = _red_png()
    offset, length = _idat_payload_offset(data)
    return _flip_byte(data, offset + length)


def _png_with_corrupt_pixel_data() -> bytes:
    """A PNG whose compressed pixel data is damaged (zlib fails), with a matching CRC."""
    data = _red_png()
    offset, length = _idat_payload_offset(data)
    payload = bytes(b ^ 0xFF for b in data[offset : offset + length])
    return data[: offset - 8] + _png_chunk(b"IDAT", payload) + data[offset + length + 4 :]


def _quadrant_image(mode: str, colours: tuple[tuple[int, ...], ...]) -> Image.Image:
    """A 64x64 image of four flat quadrants: top-left, top-right, bottom-left, bottom-right."""
    image = Image.new(mode, (64, 64))
    for (x, y), colour in zip(((0, 0), (32, 0), (0, 32), (32, 32)), colours, strict=True):
        image.paste(colour, (x, y, x + 32, y + 32))
    return image


CMYK_QUADRANTS = ((0, 255, 255, 0), (255, 0, 255, 0), (255, 255, 0, 0), (0, 0, 0, 0))
RGB_QUADRANTS = (RED, GREEN, BLUE, WHITE)


def _cmyk_jpeg() -> bytes:
    """A CMYK JPEG (Pillow writes Adobe's inverted polarity) of red, green, blue, white."""
    return _encode(_quadrant_image("CMYK", CMYK_QUADRANTS), "JPEG", quality=95)


def _check_quadrants(image: Image.Image) -> None:
    """The CMYK quadrants must come out red, green, blue and white, not inverted."""
    for (x, y), expected in zip(((16, 16), (48, 16), (16, 48), (48, 48)), RGB_QUADRANTS,
                                strict=True):
        _assert_close(image.getpixel((x, y)), expected, JPEG_TOLERANCE, f"pixel ({x}, {y})")


def _rgba_png() -> bytes:
    """A 30x10 RGBA PNG: fully transparent, half-transparent blue, opaque red (left to right)."""
    image = Image.new("RGBA", (30, 10), (0, 0, 0, 0))
    image.paste((0, 0, 255, 128), (10, 0, 20, 10))
    image.paste((255, 0, 0, 255), (20, 0, 30, 10))
    return _encode(image, "PNG")


def _check_rgba_on_white(image: Image.Image) -> None:
    """Transparent black must become white, half blue light blue, opaque red stay red."""
    _assert_close(image.getpixel((5, 5)), WHITE, EXACT_TOLERANCE, "transparent part")
    _assert_close(image.getpixel((15, 5)), (127, 127, 255), EXACT_TOLERANCE, "half-blue part")
    _assert_close(image.getpixel((25, 5)), RED, EXACT_TOLERANCE, "opaque part")


def _palette_gif() -> bytes:
    """A 20x10 paletted GIF: left half transparent (black underneath), right half green."""
    image = Image.new("P", (20, 10), 0)
    image.putpalette([0, 0, 0, 0, 255, 0])
    image.paste(1, (10, 0, 20, 10))
    return _encode(image, "GIF", transparency=0)


def _check_left_white_right_green(image: Image.Image) -> None:
    """The transparent palette entry must show as white, the opaque one as green."""
    _assert_close(image.getpixel((2, 5)), WHITE, EXACT_TOLERANCE, "transparent half")
    _assert_close(image.getpixel((15, 5)), GREEN, EXACT_TOLERANCE, "green half")


def _animated(image_format: str) -> bytes:
    """A three-frame 20x10 animation: red, then blue, then green."""
    frames = [Image.new("RGB", (20, 10), colour) for colour in (RED, BLUE, GREEN)]
    options = {"lossless": True} if image_format == "WEBP" else {}
    return _encode(frames[0], image_format, save_all=True, append_images=frames[1:],
                   duration=100, loop=0, **options)


def _mpo() -> bytes:
    """A two-picture MPO file (phone cameras write these as .jpg): red, then blue."""
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, BLUE)]
    return _encode(frames[0], "MPO", save_all=True, append_images=frames[1:])


def _sixteen_bit_png() -> bytes:
    """A 256x4 16-bit grey PNG (mode I;16) whose column x holds x * 257 (8-bit value x)."""
    gradient = np.tile(np.arange(256, dtype=np.uint16) * 257, (4, 1))  # (4, 256)
    return _encode(Image.fromarray(gradient), "PNG")


def _check_sixteen_bit_gradient(image: Image.Image) -> None:
    """Each column must come out grey with level x, not white."""
    pixels = np.asarray(image).astype(int)  # (4, 256, 3)
    expected = np.arange(256)[None, :, None]
    worst = int(np.abs(pixels - expected).max())
    assert worst <= EXACT_TOLERANCE, f"16-bit gradient off by up to {worst} levels"


def _one_bit_halves() -> Image.Image:
    """A 16x8 1-bit image: black left half, white right half."""
    image = Image.new("1", (16, 8), 0)
    image.paste(1, (8, 0, 16, 8))
    return image


def _check_black_left_white_right(image: Image.Image) -> None:
    """A 1-bit image must keep its black and white halves."""
    _assert_close(image.getpixel((2, 4)), (0, 0, 0), EXACT_TOLERANCE, "black half")
    _assert_close(image.getpixel((12, 4)), WHITE, EXACT_TOLERANCE, "white half")


def _exif_rotated_jpeg(orientation: int) -> bytes:
    """A 60x40 grey JPEG, red in its stored top-left corner, with an EXIF orientation tag.

    Orientation 6 means "rotate 90 degrees clockwise to display": the corner ends top right.
    Orientation 8 means "rotate 90 degrees counter-clockwise": the corner ends bottom left.
    """
    image = Image.new("RGB", (60, 40), GREY)
    image.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    return _encode(image, "JPEG", quality=95, exif=exif)


def _expect_red_corner(corner: str) -> Callable[[Image.Image], None]:
    """Check an upright 40x60 image whose only red corner is the named one."""

    def check(image: Image.Image) -> None:
        assert image.size == (40, 60), f"size {image.size}, expected (40, 60): not rotated"
        corners = {"top_left": (4, 4), "top_right": (35, 4), "bottom_left": (4, 55),
                   "bottom_right": (35, 55)}
        for name, point in corners.items():
            expected = RED if name == corner else GREY
            _assert_close(image.getpixel(point), expected, JPEG_TOLERANCE, f"{name} corner")

    return check


def _expect_uniform(colour: tuple[int, int, int], tolerance: int) -> Callable[[Image.Image], None]:
    """Check that every pixel of the image is close to colour."""

    def check(image: Image.Image) -> None:
        worst = int(np.abs(np.asarray(image).astype(int) - np.array(colour)).max())
        assert worst <= tolerance, f"a pixel is {worst} levels away from {colour}"

    return check


def _expect_size_and_colour(
    size: tuple[int, int], colour: tuple[int, int, int], tolerance: int = EXACT_TOLERANCE
) -> Callable[[Image.Image], None]:
    """Check the image size and its centre colour."""

    def check(image: Image.Image) -> None:
        assert image.size == size, f"size {image.size}, expected {size}"
        centre = (size[0] // 2, size[1] // 2)
        _assert_close(image.getpixel(centre), colour, tolerance, "centre")

    return check


def _assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int,
                  where: str) -> None:
    """Fail with a readable message when two RGB colours differ by more than tolerance."""
    difference = max(abs(a - e) for a, e in zip(actual, expected, strict=True))
    assert difference <= tolerance, f"{where}: got {actual}, expected {expected}"
