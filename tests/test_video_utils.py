"""Tests for utils/video_utils.py: layer frames and H.264 MP4 encoding."""

from __future__ import annotations

import os
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image, ImageFont

from utils import video_utils
from utils.video_utils import LABEL_BACKGROUND, VideoEncodingError, encode_mp4, layer_frames

ODD_HEIGHT, ODD_WIDTH = 75, 101


def odd_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """count flat-colour (75, 101, 3) uint8 frames: odd sizes, as a cropped upload gives."""
    levels = np.random.default_rng(seed).integers(0, 256, (count, 3))
    return [np.full((ODD_HEIGHT, ODD_WIDTH, 3), level, dtype=np.uint8) for level in levels]


def decode(video: bytes) -> list[np.ndarray]:
    """Decode MP4 bytes into frames through a private temporary file."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "video.mp4")
        with open(path, "wb") as video_file:
            video_file.write(video)
        with imageio.get_reader(path, format="FFMPEG") as reader:
            # Not list(reader): its len() is sys.maxsize for streams, so list() preallocates
            # until MemoryError.
            return [frame for frame in reader]


def top_level_boxes(video: bytes) -> list[bytes]:
    """Return the types of the top-level MP4 boxes in file order."""
    boxes, offset = [], 0
    while offset + 8 <= len(video):
        size, box_type = struct.unpack(">I4s", video[offset : offset + 8])
        if size == 1:  # 64-bit size follows the type
            size = struct.unpack(">Q", video[offset + 8 : offset + 16])[0]
        boxes.append(box_type)
        if size == 0:  # box runs to the end of the file
            break
        offset += size
    return boxes


# Encoding ----------------------------------------------------------------------------------

def test_odd_sized_frames_encode_to_padded_faststart_h264() -> None:
    frames = odd_frames(6)
    video = encode_mp4(frames, fps=6)
    boxes = top_level_boxes(video)
    assert boxes[0] == b"ftyp"
    assert boxes.index(b"moov") < boxes.index(b"mdat")  # faststart: playable while loading
    decoded = decode(video)
    assert len(decoded) == 6
    assert {frame.shape for frame in decoded} == {(ODD_HEIGHT + 1, ODD_WIDTH + 1, 3)}
    # Edge padding keeps the colour; yuv420p and H.264 round it a little.
    assert np.abs(decoded[0].astype(int) - frames[0][0, 0].astype(int)).max() <= 12


def test_encoding_with_imageio_trap_settings_raises_instead_of_returning_empty_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Odd frames with macro_block_size=1 make ffmpeg write 0 bytes silently: we must catch it."""
    real_get_writer = imageio.get_writer

    def trap_writer(*args: object, **options: object) -> object:
        return real_get_writer(*args, **{**options, "macro_block_size": 1})

    monkeypatch.setattr(video_utils, "_pad_to_even", lambda frame: frame)
    monkeypatch.setattr(video_utils.imageio, "get_writer", trap_writer)
    with pytest.raises(VideoEncodingError, match="empty"):
        encode_mp4(odd_frames(3), fps=5)


def test_two_threads_encoding_at_once_both_succeed() -> None:
    jobs = [odd_frames(4, seed=1), odd_frames(7, seed=2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        videos = list(pool.map(lambda frames: encode_mp4(frames, fps=5), jobs))
    assert [len(decode(video)) for video in videos] == [4, 7]


def test_encode_rejects_empty_and_mixed_frames() -> None:
    with pytest.raises(ValueError, match="No frames"):
        encode_mp4([], fps=5)
    mixed = [*odd_frames(2), np.zeros((ODD_HEIGHT, ODD_WIDTH + 1, 3), dtype=np.uint8)]
    with pytest.raises(ValueError, match="frame 2"):
        encode_mp4(mixed, fps=5)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4([np.zeros((4, 4, 3), dtype=np.float32)], fps=5)


# Layer frames ------------------------------------------------------------------------------

def gradient_image(width: int = 120, height: int = 80) -> Image.Image:
    """An RGB image with a horizontal gradient."""
    row = np.linspace(0, 255, width).astype(np.uint8)
    return Image.fromarray(np.stack([np.tile(row, (height, 1))] * 3, axis=2))


def heat_stack(scales: list[float], width: int = 120, height: int = 80) -> np.ndarray:
    """(L, H, W) maps: one left-to-right ramp per layer, multiplied by each scale."""
    ramp = np.tile(np.linspace(0.0, 1.0, width), (height, 1))
    return np.stack([scale * ramp for scale in scales])


def make_frames(heat_maps: np.ndarray, **options: object) -> list[np.ndarray]:
    """layer_frames on gradient_image() with labels "layer i/L" and the word "dog"."""
    count = len(heat_maps)
    settings = {"alpha": 0.6, "colormap": "jet", "hold_frames": 2, "fade_frames": 3, **options}
    labels = [f"layer {index}/{count}" for index in range(1, count + 1)]
    return layer_frames(gradient_image(), heat_maps, labels, "dog", **settings)


def label_height(frame: np.ndarray) -> int:
    """Height of the label bar above the image part of a frame: the top rows whose left edge has
    the bar's colour (text keeps a margin; the gradient image's left edge is never that colour)."""
    left_edge = frame[:, 0].astype(int)  # (h, 3)
    return int(np.argmax((left_edge != LABEL_BACKGROUND).any(axis=1)))


def test_frame_count_holds_and_linear_fades() -> None:
    frames = make_frames(heat_stack([1.0, 1.0, 1.0]), hold_frames=2, fade_frames=3)
    assert len(frames) == 3 * 2 + 2 * 3
    assert len({frame.shape for frame in frames}) == 1
    first, second = frames[0], frames[2 + 3]
    middle = frames[2 + 1].astype(int)  # second of three fade frames: halfway
    expected = (first.astype(int) + second.astype(int)) / 2
    assert np.abs(middle - expected).max() <= 1


def test_frames_are_read_only_and_inputs_untouched() -> None:
    image, heat_maps = gradient_image(), heat_stack([1.0, 2.0])
    heat_maps[:, :, :10] = np.nan
    image_before, heat_before = image.tobytes(), heat_maps.copy()
    frames = layer_frames(image, heat_maps, ["a", "b"], "dog", alpha=0.5, colormap="jet",
                          hold_frames=1, fade_frames=1)
    assert not any(frame.flags.writeable for frame in frames)
    assert image.tobytes() == image_before
    np.testing.assert_array_equal(heat_maps, heat_before)


def test_labels_differ_between_layers_in_the_label_strip_only() -> None:
    frames = make_frames(heat_stack([1.0, 1.0]), hold_frames=1, fade_frames=0)
    bar = label_height(frames[0])
    assert bar > 0
    assert not np.array_equal(frames[0][:bar], frames[1][:bar])
    np.testing.assert_array_equal(frames[0][bar:], frames[1][bar:])
    assert len(np.unique(frames[0][:bar])) > 2  # text drawn on the bar


def test_long_labels_wrap_inside_a_narrow_frame_and_every_frame_keeps_one_size() -> None:
    labels = ["decoder cross-attention 1/3", "decoder cross-attention, mean of all 3 layers"]
    frames = layer_frames(gradient_image(), heat_stack([1.0, 1.0]), labels, "triangle", alpha=0.5,
                          colormap="jet", hold_frames=1, fade_frames=1)
    assert len({frame.shape for frame in frames}) == 1
    bar = label_height(frames[0])
    one_line_bar = label_height(make_frames(heat_stack([1.0]), hold_frames=1, fade_frames=0)[0])
    assert bar >= 3 * one_line_bar // 2  # wrapped onto more lines than one
    for key_frame in (frames[0], frames[-1]):
        text_columns = np.flatnonzero((key_frame[:bar] > 128).any(axis=(0, 2)))
        assert text_columns.size and text_columns.max() < key_frame.shape[1] - 2  # nothing cut at the edge


def test_shared_scale_compares_layers_and_per_map_scale_stretches_each() -> None:
    heat_maps = heat_stack([0.5, 1.0])
    shared = make_frames(heat_maps, hold_frames=1, fade_frames=0, shared_scale=True)
    alone = make_frames(heat_maps, hold_frames=1, fade_frames=0, shared_scale=False)
    bar = label_height(shared[0])
    assert not np.array_equal(shared[0][bar:], shared[1][bar:])  # weak layer looks weaker
    np.testing.assert_array_equal(alone[0][bar:], alone[1][bar:])  # both stretched to full
    np.testing.assert_array_equal(shared[1][bar:], alone[1][bar:])  # the max layer agrees


def test_frames_are_downscaled_to_max_side() -> None:
    frames = make_frames(heat_stack([1.0]), hold_frames=1, fade_frames=0, max_side=60)
    assert frames[0].shape[1] == 60
    assert frames[0].shape[0] - label_height(frames[0]) == 40


def test_a_small_image_is_upsampled_smoothly_to_a_long_side_of_512_with_even_sizes() -> None:
    """A 128-pixel example played at a column's width must not be a blown-up 128-pixel video."""
    halves = np.zeros((96, 128, 3), dtype=np.uint8)
    halves[:, 64:] = 255  # one hard edge: a smooth filter gives in-between greys along it
    image = Image.fromarray(halves)
    frames = layer_frames(image, np.ones((1, 96, 128)), ["layer 1/1"], "dog", alpha=0.0, colormap="jet",
                          hold_frames=1, fade_frames=0)
    bar = label_height(frames[0])
    assert frames[0].shape[1] == 512 and frames[0].shape[0] - bar == 384
    assert frames[0].shape[0] % 2 == 0 and bar % 2 == 0
    # alpha 0 shows the image alone: exactly Pillow's Lanczos upsampling, never nearest-neighbour.
    np.testing.assert_array_equal(frames[0][bar:], np.asarray(image.resize((512, 384), Image.Resampling.LANCZOS)))
    assert len(np.unique(frames[0][bar:])) > 10


@pytest.mark.parametrize(("width", "height"), [(75, 101), (101, 75), (128, 128), (3000, 1001), (700, 2)])
def test_frames_have_a_long_side_of_512_and_even_sizes_at_any_aspect(width: int, height: int) -> None:
    frames = layer_frames(gradient_image(width, height), heat_stack([0.5, 1.0], width, height), ["one", "two"],
                          "dog", alpha=0.5, colormap="jet", hold_frames=1, fade_frames=1)
    frame_height, frame_width = frames[0].shape[:2]
    image_height = frame_height - label_height(frames[0])
    assert max(frame_width, image_height) == 512
    assert frame_width % 2 == 0 and frame_height % 2 == 0
    assert abs(frame_width / image_height - width / height) <= 2 * (width / height) / min(frame_width, image_height)
    assert len(decode(encode_mp4(frames, fps=4))) == 3


def test_labels_are_drawn_in_dejavu_sans_scaled_to_the_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    fonts = []

    def recording_font(size: int) -> ImageFont.FreeTypeFont:
        fonts.append(real_font(size))
        return fonts[-1]

    real_font = video_utils.label_font
    monkeypatch.setattr(video_utils, "label_font", recording_font)
    frames = layer_frames(gradient_image(128, 128), heat_stack([1.0], 128, 128), ["layer 1/1"], "dog", alpha=0.5,
                          colormap="jet", hold_frames=1, fade_frames=0)
    assert [font.getname() for font in fonts] == [("DejaVu Sans", "Book")]
    assert isinstance(fonts[0], ImageFont.FreeTypeFont) and fonts[0].size >= 16  # scaled for 512 px, not 128
    label_band = frames[0][: label_height(frames[0])].astype(int)
    assert (label_band == label_band[..., :1]).all()  # white text on a dark grey bar: greys only
    # An antialiased outline font leaves many grey levels along glyph edges; a bitmap font two.
    assert len(np.unique(label_band)) > 8
    text_rows = np.flatnonzero((label_band > 128).any(axis=(1, 2)))
    assert text_rows.max() - text_rows.min() >= 12  # glyphs as tall as the font, not 128-pixel-sized


def test_even_frames_are_encoded_without_a_padded_copy() -> None:
    frame = np.zeros((4, 6, 3), dtype=np.uint8)
    assert video_utils._pad_to_even(frame) is frame
    assert video_utils._pad_to_even(np.zeros((5, 6, 3), dtype=np.uint8)).shape == (6, 6, 3)


@pytest.mark.parametrize(
    ("heat_maps", "labels", "options", "message"),
    [
        (heat_stack([1.0, 1.0]), ["only one"], {}, "labels"),
        (heat_stack([1.0], width=119), ["a"], {}, "heat_maps"),
        (heat_stack([1.0]), ["a"], {"hold_frames": 0}, "hold_frames"),
    ],
)
def test_layer_frames_rejects_bad_arguments(
    heat_maps: np.ndarray, labels: list[str], options: dict, message: str
) -> None:
    settings = {"alpha": 0.5, "colormap": "jet", "hold_frames": 1, "fade_frames": 0, **options}
    with pytest.raises(ValueError, match=message):
        layer_frames(gradient_image(), heat_maps, labels, "dog", **settings)


def test_layer_frames_encode_end_to_end() -> None:
    frames = make_frames(heat_stack([0.2, 1.0]), hold_frames=1, fade_frames=1)
    assert len(decode(encode_mp4(frames, fps=4))) == 3
