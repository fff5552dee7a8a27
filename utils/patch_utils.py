"""Geometry between original image pixels, model input pixels and ViT patches; masking.

Three coordinate spaces, named in every variable:
- image: pixels of the original (EXIF-corrected) image, (x, y) with x to the right.
- model: pixels of the model input after the processor's resize (and crop).
- patch: the ViT grid, ``patch_id = row * grid_width + column``.

Every size comes from a ``PatchGeometry`` that the explainers build from their processor
and config; nothing here knows BLIP's 384 or CLIP's 224. Functions are pure: they never
modify their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

ResizeMode = Literal["squash", "shortest_edge_crop"]
FillMode = Literal["black", "mean", "blur", "noise"]
FILL_MODES: tuple[str, ...] = ("black", "mean", "blur", "noise")
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Box:
    """Axis-aligned rectangle in pixels; ``x1``/``y1`` are exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)

    def contains(self, x: float, y: float, tolerance: float = 0.0) -> bool:
        """Whether point (x, y) lies inside the box grown by ``tolerance`` on every side."""
        return (
            self.x0 - tolerance <= x < self.x1 + tolerance
            and self.y0 - tolerance <= y < self.y1 + tolerance
        )


@dataclass(frozen=True)
class PatchGeometry:
    """How a processor maps an image onto a model's patch grid.

    Args:
        model_size: (height, width) of the model input in pixels.
        patch_size: side of one square patch in model pixels.
        resize_mode: "squash" resizes the whole image to ``model_size`` without keeping its
            aspect (BLIP); "shortest_edge_crop" resizes the short side to the model size and
            centre-crops (CLIP), so the margins of a non-square image are never seen.
    """

    model_size: tuple[int, int]
    patch_size: int
    resize_mode: ResizeMode

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid."""
        height, width = self.model_size
        return height // self.patch_size, width // self.patch_size

    @property
    def patch_count(self) -> int:
        rows, columns = self.grid_shape
        return rows * columns

    def visible_box(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """Region of the original image that the model input covers, in image pixels.

        Args:
            image_size: (width, height) of the original image.
        Returns:
            (x0, y0, x1, y1) as floats: the whole image for "squash", the centre crop otherwise.
        """
        image_width, image_height = image_size
        if self.resize_mode == "squash":
            return 0.0, 0.0, float(image_width), float(image_height)
        model_height, model_width = self.model_size
        # The short side is scaled to the model size, then the centre is cropped out.
        scale = max(model_width / image_width, model_height / image_height)
        crop_width, crop_height = model_width / scale, model_height / scale
        x0 = (image_width - crop_width) / 2
        y0 = (image_height - crop_height) / 2
        return x0, y0, x0 + crop_width, y0 + crop_height

    def image_to_model_point(
        self, image_size: tuple[int, int], point_image: tuple[float, float]
    ) -> tuple[float, float]:
        """Map a point from original image pixels to model input pixels."""
        x0, y0, x1, y1 = self.visible_box(image_size)
        model_height, model_width = self.model_size
        x_image, y_image = point_image
        return (
            (x_image - x0) * model_width / (x1 - x0),
            (y_image - y0) * model_height / (y1 - y0),
        )

    def model_to_image_point(
        self, image_size: tuple[int, int], point_model: tuple[float, float]
    ) -> tuple[float, float]:
        """Map a point from model input pixels back to original image pixels."""
        x0, y0, x1, y1 = self.visible_box(image_size)
        model_height, model_width = self.model_size
        x_model, y_model = point_model
        return (
            x0 + x_model * (x1 - x0) / model_width,
            y0 + y_model * (y1 - y0) / model_height,
        )

    def patch_at_model_point(self, point_model: tuple[float, float]) -> int | None:
        """Patch id containing a model-pixel point, or None outside the model input."""
        x_model, y_model = point_model
        rows, columns = self.grid_shape
        column, row = int(x_model // self.patch_size), int(y_model // self.patch_size)
        if not (0 <= row < rows and 0 <= column < columns):
            return None
        return row * columns + column

    def patch_box_image(self, image_size: tuple[int, int], patch_id: int) -> Box:
        """The pixels of the original image that one patch covers (rounded outwards)."""
        columns = self.grid_shape[1]
        row, column = divmod(patch_id, columns)
        left, top = self.model_to_image_point(
            image_size, (column * self.patch_size, row * self.patch_size)
        )
        right, bottom = self.model_to_image_point(
            image_size, ((column + 1) * self.patch_size, (row + 1) * self.patch_size)
        )
        return clamp_box(
            Box(math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)),
            image_size,
        )

    def patch_lines_image(self, image_size: tuple[int, int]) -> tuple[list[float], list[float]]:
        """x and y positions, in image pixels, of every patch boundary (for drawing a grid)."""
        rows, columns = self.grid_shape
        xs = [
            self.model_to_image_point(image_size, (column * self.patch_size, 0))[0]
            for column in range(columns + 1)
        ]
        ys = [
            self.model_to_image_point(image_size, (0, row * self.patch_size))[1]
            for row in range(rows + 1)
        ]
        return xs, ys


def clamp_box(box: Box, image_size: tuple[int, int]) -> Box:
    """Clip a box to the image bounds (width, height)."""
    width, height = image_size
    return Box(
        min(max(box.x0, 0), width),
        min(max(box.y0, 0), height),
        min(max(box.x1, 0), width),
        min(max(box.y1, 0), height),
    )


def click_to_image(value: object, image_size: tuple[int, int]) -> tuple[float, float] | None:
    """A click from the image component, in original image pixels; None for a malformed value.

    The browser sends {"x", "y", "width", "height"} in displayed pixels. Anything else (a
    missing key, a string, a bool, NaN, a zero or negative size, a point outside the shown
    image) is ignored rather than trusted: the values come from the page, not from us.
    """
    if not isinstance(value, dict):
        return None
    numbers = [value.get(key) for key in ("x", "y", "width", "height")]
    if not all(isinstance(number, int | float) and not isinstance(number, bool) for number in numbers):
        return None
    x, y, width, height = (float(number) for number in numbers)
    if not all(math.isfinite(number) for number in (x, y, width, height)) or width <= 0 or height <= 0:
        return None
    if not (0 <= x <= width and 0 <= y <= height):
        return None
    image_width, image_height = image_size
    return x * image_width / width, y * image_height / height


def box_from_corners(
    corner_a: tuple[float, float], corner_b: tuple[float, float], image_size: tuple[int, int]
) -> Box:
    """Rectangle spanned by two clicked corners in any order, clamped to the image.

    Both corners are included: a click on pixel (10, 10) covers that pixel.
    """
    (xa, ya), (xb, yb) = corner_a, corner_b
    box = Box(
        math.floor(min(xa, xb)),
        math.floor(min(ya, yb)),
        math.floor(max(xa, xb)) + 1,
        math.floor(max(ya, yb)) + 1,
    )
    return clamp_box(box, image_size)


def patches_in_box(geometry: PatchGeometry, image_size: tuple[int, int], box_image: Box) -> list[int]:
    """Ids of every patch that the box (in image pixels) touches, in row-major order."""
    if box_image.area == 0:
        return []
    left, top = geometry.image_to_model_point(image_size, (box_image.x0, box_image.y0))
    right, bottom = geometry.image_to_model_point(image_size, (box_image.x1, box_image.y1))
    rows, columns = geometry.grid_shape
    size = geometry.patch_size
    first_column, last_column = max(math.floor(left / size), 0), min(math.ceil(right / size), columns)
    first_row, last_row = max(math.floor(top / size), 0), min(math.ceil(bottom / size), rows)
    return [
        row * columns + column
        for row in range(first_row, last_row)
        for column in range(first_column, last_column)
    ]


def top_patches(cam_grid: np.ndarray, fraction: float) -> list[int]:
    """Ids of the highest-scoring patches, the top ``fraction`` of the grid (at least one).

    Args:
        cam_grid: (rows, columns) float heatmap on the patch grid.
        fraction: share of patches to return, in (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = np.asarray(cam_grid, dtype=np.float64).ravel()
    count = max(1, round(fraction * flat.size))
    # Stable sort so equal scores keep a reproducible (row-major) order.
    return sorted(np.argsort(-flat, kind="stable")[:count].tolist())


def cam_grid_to_image(
    cam_grid: np.ndarray, geometry: PatchGeometry, image_size: tuple[int, int]
) -> np.ndarray:
    """Upsample a patch-grid heatmap to original image pixels (bilinear).

    Args:
        cam_grid: (rows, columns) float heatmap.
        geometry: the model's geometry; decides which part of the image the map covers.
        image_size: (width, height) of the original image.
    Returns:
        (height, width) float32; NaN where the model never saw the image (CLIP's crop margins).
    """
    cam_grid = np.asarray(cam_grid, dtype=np.float32)
    if cam_grid.shape != geometry.grid_shape:
        raise ValueError(f"cam_grid shape {cam_grid.shape} != grid {geometry.grid_shape}")
    image_width, image_height = image_size
    x0, y0, x1, y1 = geometry.visible_box(image_size)
    covered_width = max(round(x1) - round(x0), 1)
    covered_height = max(round(y1) - round(y0), 1)
    covered = Image.fromarray(cam_grid).resize(
        (covered_width, covered_height), Image.Resampling.BILINEAR
    )
    cam_image = np.full((image_height, image_width), np.nan, dtype=np.float32)
    cam_image[round(y0) : round(y0) + covered_height, round(x0) : round(x0) + covered_width] = (
        np.asarray(covered)[: image_height - round(y0), : image_width - round(x0)]
    )
    return cam_image


def cam_grids_to_image(
    cam_grids: np.ndarray, geometry: PatchGeometry, image_size: tuple[int, int]
) -> np.ndarray:
    """``cam_grid_to_image`` for a stack of maps: (maps, rows, columns) -> (maps, height, width)."""
    return np.stack([cam_grid_to_image(cam_grid, geometry, image_size) for cam_grid in cam_grids])


def mask_boxes(
    image: Image.Image,
    boxes_image: Iterable[Box],
    fill: FillMode | Colour = "black",
    *,
    seed: int = 0,
) -> Image.Image:
    """Return a copy of ``image`` with every box replaced by ``fill``.

    Args:
        image: RGB original image (not modified).
        boxes_image: rectangles in image pixels; they may overlap.
        fill: "black"; "mean" (mean colour of the whole image, so the object's own colour does
            not leak back in); "blur" (Gaussian, radius 1/10 of the short side); "noise"
            (uniform RGB from ``seed``); or an explicit (r, g, b) colour.
        seed: random seed for "noise", so masking is reproducible.
    """
    pixels = np.asarray(image.convert("RGB")).copy()  # (H, W, 3) uint8
    replacement = _fill_pixels(image, pixels, fill, seed)
    for box in boxes_image:
        box = clamp_box(box, image.size)
        pixels[box.y0 : box.y1, box.x0 : box.x1] = replacement[box.y0 : box.y1, box.x0 : box.x1]
    return Image.fromarray(pixels)


def mask_patches(
    image: Image.Image,
    geometry: PatchGeometry,
    patch_ids: Sequence[int],
    fill: FillMode | Colour = "black",
    *,
    seed: int = 0,
) -> Image.Image:
    """Return a copy of ``image`` with the given patches' pixels replaced by ``fill``."""
    boxes = [geometry.patch_box_image(image.size, patch_id) for patch_id in patch_ids]
    return mask_boxes(image, boxes, fill, seed=seed)


def _fill_pixels(
    image: Image.Image, pixels: np.ndarray, fill: FillMode | Colour, seed: int
) -> np.ndarray:
    """A full-size (H, W, 3) uint8 array to copy masked regions from."""
    if isinstance(fill, tuple):
        if len(fill) != 3 or not all(0 <= channel <= 255 for channel in fill):
            raise ValueError(f"a fill colour is (r, g, b) in 0..255, got {fill}")
        return np.broadcast_to(np.array(fill, dtype=np.uint8), pixels.shape)
    if fill == "black":
        return np.zeros_like(pixels)
    if fill == "mean":
        mean_colour = pixels.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
        return np.broadcast_to(mean_colour, pixels.shape)
    if fill == "blur":
        radius = max(min(image.size) / 10, 1)
        return np.asarray(image.convert("RGB").filter(ImageFilter.GaussianBlur(radius)))
    if fill == "noise":
        return np.random.default_rng(seed).integers(0, 256, pixels.shape, dtype=np.uint8)
    raise ValueError(f"unknown fill {fill!r}; choose one of {FILL_MODES} or an (r, g, b) colour")
