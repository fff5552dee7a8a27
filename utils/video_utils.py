"""Frames of a heatmap evolving through the layers, and their encoding as H.264 MP4 bytes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import imageio.v2 as imageio
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from utils.image_utils import finite_range, overlay_heatmap

LABEL_BACKGROUND = (20, 20, 20)
LABEL_TEXT_COLOUR = (255, 255, 255)
LABEL_FONT_FILE = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
LABEL_MIN_FONT_SIZE = 12
LABEL_FONT_DIVISOR = 30  # font size = frame's longer side / this: 17 px on a 512-pixel frame


class VideoEncodingError(RuntimeError):
    """ffmpeg did not produce a playable video; the message is meant for the user."""


def layer_frames(
    image: Image.Image,
    heat_maps: np.ndarray,
    layer_labels: Sequence[str],
    word: str,
    *,
    alpha: float,
    colormap: str,
    shared_scale: bool = True,
    hold_frames: int,
    fade_frames: int,
    min_side: int = 512,
    max_side: int = 512,
) -> list[np.ndarray]:
    """Build the frames of a video that walks through one heatmap per layer.

    Each layer's overlay is shown for hold_frames, then cross-faded linearly into the next
    over fade_frames; every frame carries a label bar on top ("<layer label> · word: <word>"),
    drawn after scaling in DejaVu Sans (a scalable, antialiased font) so that it stays sharp.

    Args:
        image: RGB image of size (W, H).
        heat_maps: (L, H, W) float, one map per layer in image pixels; NaN = not covered.
        layer_labels: L strings naming the layers, e.g. "layer 3/12".
        word: the caption word being explained.
        alpha: heatmap weight in [0, 1].
        colormap: one of image_utils.colormap_names().
        shared_scale: one colour scale (min..max over all layers) so layers compare;
            False stretches each map alone.
        hold_frames: frames each layer stays still, >= 1.
        fade_frames: in-between frames from one layer to the next, >= 0.
        min_side: a smaller image is upsampled (smoothly) until its longer side is this: a
            128-pixel image played at a column's width would otherwise be blown up and blurred.
        max_side: a larger image is downscaled until its longer side is at most this; wins
            over min_side when smaller.

    Returns:
        L * hold_frames + (L - 1) * fade_frames read-only (h + bar, w, 3) uint8 arrays of even
        height and width (as H.264's yuv420p needs); held frames share one array.
    """
    heat_maps = np.asarray(heat_maps)
    _check_layer_arguments(image, heat_maps, layer_labels, hold_frames, fade_frames)
    frame_image = _scale_for_video(image, min_side, max_side)
    # Resize the maps, not the overlays: the colour scale then spans the values actually drawn,
    # and no full-resolution copy of L maps is ever made.
    frame_maps = np.stack([_resize_heat(heat_map, frame_image.size) for heat_map in heat_maps])
    value_range = finite_range(frame_maps) if shared_scale else None
    font = label_font(max(LABEL_MIN_FONT_SIZE, round(max(frame_image.size) / LABEL_FONT_DIVISOR)))
    text_width = frame_image.width - font.size  # half a character of margin on each side
    label_lines = [_wrap_label(f"{label} · word: {word}", font, text_width) for label in layer_labels]
    # Every frame gets a bar of the same height: the encoder needs one frame size.
    line_count = max(len(lines) for lines in label_lines)
    key_frames = [
        _add_label_bar(overlay_heatmap(frame_image, frame_map, alpha=alpha, colormap=colormap,
                                       value_range=value_range), lines, line_count, font)
        for frame_map, lines in zip(frame_maps, label_lines, strict=True)
    ]
    return _hold_and_fade(key_frames, hold_frames, fade_frames)


def label_font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib) at ``size`` pixels: scalable and antialiased.

    A new font object per call: a FreeType face must not be shared by threads that draw at once.
    """
    return ImageFont.truetype(str(LABEL_FONT_FILE), size)


def _scale_for_video(image: Image.Image, min_side: int, max_side: int) -> Image.Image:
    """``image`` resized (aspect kept) so that its longer side lies in [min(min_side, max_side), max_side],
    with even width and height; Lanczos both ways (smooth when upsampling, no aliasing when shrinking)."""
    if min_side < 2 or max_side < 2:
        raise ValueError(f"min_side and max_side must be at least 2, got {min_side} and {max_side}.")
    width, height = image.size
    long_side = max(width, height)
    target = min(max(long_side, min_side), max_side)
    scale = target / long_side
    # Round down to even sizes: never past max_side, and the short side moves by under 2 pixels.
    size = (_even_at_most(width * scale), _even_at_most(height * scale))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _even_at_most(length: float) -> int:
    """The largest even whole number <= length (rounded to 6 decimals), and at least 2."""
    return max(2, 2 * int(round(length, 6) // 2))


def _check_layer_arguments(
    image: Image.Image,
    heat_maps: np.ndarray,
    layer_labels: Sequence[str],
    hold_frames: int,
    fade_frames: int,
) -> None:
    """Raise ValueError with a clear message for inconsistent layer_frames arguments."""
    expected_shape = (image.height, image.width)
    if heat_maps.ndim != 3 or heat_maps.shape[1:] != expected_shape or len(heat_maps) == 0:
        raise ValueError(
            f"heat_maps must be (L, H, W) with L >= 1 and (H, W) = {expected_shape}, "
            f"got shape {heat_maps.shape}."
        )
    if len(layer_labels) != len(heat_maps):
        raise ValueError(f"Got {len(layer_labels)} layer labels for {len(heat_maps)} maps.")
    if hold_frames < 1 or fade_frames < 0:
        raise ValueError(
            f"Need hold_frames >= 1 and fade_frames >= 0, got {hold_frames} and {fade_frames}."
        )


def _resize_heat(heat_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W) map to size = (w, h) as float32, bilinearly; NaN spreads ~1 source pixel."""
    as_image = Image.fromarray(heat_map.astype(np.float32))  # mode F keeps float values
    if as_image.size != size:
        as_image = as_image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(as_image)


def _wrap_label(label: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Split label at spaces into lines no wider than width pixels (a longer word keeps a line)."""
    lines: list[str] = []
    for word in label.split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _add_label_bar(
    image: Image.Image, lines: Sequence[str], line_count: int, font: ImageFont.FreeTypeFont
) -> np.ndarray:
    """Return (h + bar, w, 3) uint8: a dark bar of line_count text lines above the image; bar is even."""
    line_height = round(font.size * 1.2)
    bar_height = line_count * line_height + round(font.size * 0.4)
    bar_height += bar_height % 2  # an even bar keeps an even image's frame even
    framed = Image.new("RGB", (image.width, image.height + bar_height), LABEL_BACKGROUND)
    framed.paste(image, (0, bar_height))
    draw = ImageDraw.Draw(framed)
    for index, line in enumerate(lines):
        centre_y = round(font.size * 0.2) + index * line_height + line_height // 2
        draw.text((font.size // 2, centre_y), line, fill=LABEL_TEXT_COLOUR, font=font, anchor="lm")
    return np.asarray(framed)


def _hold_and_fade(
    key_frames: list[np.ndarray], hold_frames: int, fade_frames: int
) -> list[np.ndarray]:
    """Repeat each key frame hold_frames times, with fade_frames linear blends in between."""
    frames: list[np.ndarray] = []
    for index, key_frame in enumerate(key_frames):
        key_frame.flags.writeable = False  # held frames share it; nobody may edit one copy
        frames.extend([key_frame] * hold_frames)
        if index + 1 < len(key_frames):
            frames.extend(_cross_fade(key_frame, key_frames[index + 1], fade_frames))
    return frames


def _cross_fade(start: np.ndarray, end: np.ndarray, count: int) -> list[np.ndarray]:
    """Return count frames blending linearly from start to end, both ends excluded."""
    blends = []
    for step in range(1, count + 1):
        weight = step / (count + 1)
        blend = np.round((1.0 - weight) * start + weight * end).astype(np.uint8)
        blend.flags.writeable = False
        blends.append(blend)
    return blends


def encode_mp4(frames: Sequence[np.ndarray], fps: int) -> bytes:
    """Encode frames as an H.264 MP4 (yuv420p, moov atom first) and return its bytes.

    Frames of odd width or height are padded by one edge pixel to even sizes, which
    yuv420p requires.

    Args:
        frames: non-empty sequence of (h, w, 3) uint8 arrays, all of one shape.
        fps: frames per second, >= 1.

    Raises:
        ValueError: for empty, mixed-shape or non-RGB-uint8 frames, or fps < 1.
        VideoEncodingError: when ffmpeg fails or its file does not decode back to the frames.
    """
    _check_frames(frames, fps)
    padded = [_pad_to_even(frame) for frame in frames]
    # A private directory per call: concurrent sessions never share a file name.
    with tempfile.TemporaryDirectory(prefix="vlm_video_") as directory:
        path = os.path.join(directory, "layers.mp4")
        _write_mp4(path, padded, fps)
        _verify_mp4(path, len(padded), padded[0].shape)
        with open(path, "rb") as video_file:
            return video_file.read()


def _check_frames(frames: Sequence[np.ndarray], fps: int) -> None:
    """Raise ValueError unless frames are a non-empty list of same-shape RGB uint8 arrays."""
    if len(frames) == 0:
        raise ValueError("No frames to encode.")
    if fps < 1:
        raise ValueError(f"fps must be at least 1, got {fps}.")
    first = frames[0]
    if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
        raise ValueError(f"Frames must be (h, w, 3) uint8, got {first.shape} {first.dtype}.")
    for index, frame in enumerate(frames):
        if frame.shape != first.shape or frame.dtype != first.dtype:
            raise ValueError(
                f"All frames must have one shape: frame 0 is {first.shape} {first.dtype}, "
                f"frame {index} is {frame.shape} {frame.dtype}."
            )


def _pad_to_even(frame: np.ndarray) -> np.ndarray:
    """Repeat the last row and/or column so that height and width are even; an even frame is
    returned as it is (held frames share one array, and a copy of each would double the memory)."""
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return frame
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _write_mp4(path: str, frames: list[np.ndarray], fps: int) -> None:
    """Run ffmpeg through imageio to write even-sized frames as H.264 yuv420p with faststart."""
    try:
        # Frames are already even, so macro_block_size=2 never makes imageio rescale them;
        # with macro_block_size=1 and odd sizes ffmpeg writes 0 bytes without an error.
        writer = imageio.get_writer(
            path, format="FFMPEG", mode="I", fps=fps, codec="libx264",
            pixelformat="yuv420p", macro_block_size=2,
            ffmpeg_params=["-movflags", "+faststart"], ffmpeg_log_level="error",
        )
        with writer:
            for frame in frames:
                writer.append_data(frame)
    except (OSError, RuntimeError, ValueError) as error:
        raise VideoEncodingError(f"ffmpeg could not encode the video: {error}") from error


def _verify_mp4(path: str, frame_count: int, frame_shape: tuple[int, ...]) -> None:
    """Decode the written file and raise VideoEncodingError unless it holds every frame."""
    if os.path.getsize(path) == 0:
        raise VideoEncodingError("ffmpeg wrote an empty video file.")
    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            decoded_shapes = [frame.shape for frame in reader]
    except (OSError, RuntimeError, ValueError) as error:
        raise VideoEncodingError(f"The encoded video does not decode: {error}") from error
    if len(decoded_shapes) != frame_count or set(decoded_shapes) != {frame_shape}:
        raise VideoEncodingError(
            f"The encoded video holds {len(decoded_shapes)} frames of shapes "
            f"{sorted(set(decoded_shapes))}; expected {frame_count} of {frame_shape}."
        )
