"""Geometry between original image pixels and the patches a model sees; rectangles; masking.

An image's geometry is one or more views. Each view is a region of the original image that
the model sees as one patch grid: the whole image squashed (BLIP), a centre crop (CLIP), the
whole image resized with its aspect kept (Qwen2-VL), or tiles plus a global view (SmolVLM,
LLaVA-NeXT). Patches are numbered view after view, row-major inside each view, so a map is one
value per patch, ``cam_patches`` of shape (patches,), and ``ImageGeometry.cam_to_image`` alone
composes it onto the original image.

Coordinate spaces, named in every variable:
- image: pixels of the original (EXIF-corrected) image, (x, y) with x to the right.
- patch: ``patch_id``, numbered across the views as above.

Every size comes from the explainers, which read their processor and config; nothing here
knows BLIP's 384 or CLIP's 224. Functions are pure: they never modify their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

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
class View:
    """One region of the original image that the model sees as one patch grid.

    Args:
        region_image: (x0, y0, x1, y1) of the original image the view covers, in image pixels
            (floats: a crop or a tile need not fall on whole pixels).
        grid_shape: (rows, columns) of the view's patches, which split the region evenly.
    """

    region_image: tuple[float, float, float, float]
    grid_shape: tuple[int, int]

    @property
    def patch_count(self) -> int:
        rows, columns = self.grid_shape
        return rows * columns

    @property
    def patch_size_image(self) -> tuple[float, float]:
        """(width, height) of one patch in image pixels."""
        x0, y0, x1, y1 = self.region_image
        rows, columns = self.grid_shape
        return (x1 - x0) / columns, (y1 - y0) / rows

    def patch_box(self, local_id: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in image pixels of the view's patch ``local_id`` (row-major)."""
        row, column = divmod(local_id, self.grid_shape[1])
        width, height = self.patch_size_image
        x0, y0 = self.region_image[:2]
        return x0 + column * width, y0 + row * height, x0 + (column + 1) * width, y0 + (row + 1) * height

    def patches_touching(self, box_image: Box) -> list[int]:
        """Local ids of the view's patches that a box in image pixels touches, row-major."""
        rows, columns = self.grid_shape
        width, height = self.patch_size_image
        x0, y0 = self.region_image[:2]
        first_column = max(math.floor((box_image.x0 - x0) / width), 0)
        last_column = min(math.ceil((box_image.x1 - x0) / width), columns)
        first_row = max(math.floor((box_image.y0 - y0) / height), 0)
        last_row = min(math.ceil((box_image.y1 - y0) / height), rows)
        return [
            row * columns + column
            for row in range(first_row, last_row)
            for column in range(first_column, last_column)
        ]

    def grid_to_image(self, cam_grid: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """Upsample the view's (rows, columns) map onto its region (bilinear).

        Returns:
            (height, width) float32 of the whole image; NaN outside the region.
        """
        image_width, image_height = image_size
        x0, y0, x1, y1 = (round(value) for value in self.region_image)
        covered = np.asarray(
            Image.fromarray(np.asarray(cam_grid, dtype=np.float32)).resize(
                (max(x1 - x0, 1), max(y1 - y0, 1)), Image.Resampling.BILINEAR
            )
        )
        cam_image = np.full((image_height, image_width), np.nan, dtype=np.float32)
        # A region may reach past the image (a tile's patches over its padding): keep what lies on it.
        top, left = max(y0, 0), max(x0, 0)
        bottom, right = min(y0 + covered.shape[0], image_height), min(x0 + covered.shape[1], image_width)
        if bottom > top and right > left:
            cam_image[top:bottom, left:right] = covered[top - y0 : bottom - y0, left - x0 : right - x0]
        return cam_image


@dataclass(frozen=True)
class ImageGeometry:
    """Where every patch a model sees lies on one original image.

    Args:
        image_size: (width, height) of the original image.
        views: the regions the model sees, in the order its patches are numbered.
    """

    image_size: tuple[int, int]
    views: tuple[View, ...]

    @property
    def patch_count(self) -> int:
        return sum(view.patch_count for view in self.views)

    def _view_starts(self) -> list[int]:
        """The id of each view's first patch."""
        starts, total = [], 0
        for view in self.views:
            starts.append(total)
            total += view.patch_count
        return starts

    def view_grids(self, cam_patches: np.ndarray) -> list[np.ndarray]:
        """Split a map of (patches,) values into one (rows, columns) grid per view."""
        flat = np.asarray(cam_patches).ravel()
        if flat.size != self.patch_count:
            raise ValueError(f"a map of {flat.size} values does not fit {self.patch_count} patches")
        return [
            flat[start : start + view.patch_count].reshape(view.grid_shape)
            for start, view in zip(self._view_starts(), self.views, strict=True)
        ]

    def cam_to_image(self, cam_patches: np.ndarray) -> np.ndarray:
        """Compose a map of (patches,) values onto the original image: each view's grid is
        upsampled onto its region, and where views overlap (tiles and a global view) the image
        shows their mean.

        Returns:
            (height, width) float32; NaN where no view covers the image (CLIP's crop margins).
        """
        grids = self.view_grids(cam_patches)
        if len(self.views) == 1:
            return self.views[0].grid_to_image(grids[0], self.image_size)
        layers = np.stack(
            [view.grid_to_image(grid, self.image_size) for view, grid in zip(self.views, grids, strict=True)]
        )  # (views, H, W)
        covered = np.isfinite(layers).sum(axis=0)
        total = np.nansum(layers, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(covered > 0, total / covered, np.nan).astype(np.float32)

    def cams_to_image(self, cam_patches: np.ndarray) -> np.ndarray:
        """``cam_to_image`` for a stack of maps: (maps, patches) -> (maps, height, width)."""
        return np.stack([self.cam_to_image(cam) for cam in cam_patches])

    def _locate(self, patch_id: int) -> tuple[View, int]:
        """The view a patch belongs to, and its id inside that view."""
        for start, view in zip(self._view_starts(), self.views, strict=True):
            if start <= patch_id < start + view.patch_count:
                return view, patch_id - start
        raise ValueError(f"patch {patch_id} is not among the {self.patch_count} patches")

    def patch_box_image(self, patch_id: int) -> Box:
        """The pixels of the original image that one patch covers (rounded outwards)."""
        view, local_id = self._locate(patch_id)
        left, top, right, bottom = view.patch_box(local_id)
        return clamp_box(Box(math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)), self.image_size)

    def patches_in_box(self, box_image: Box) -> list[int]:
        """Ids of every patch, in any view, that the box (in image pixels) touches."""
        if box_image.area == 0:
            return []
        return [
            start + local_id
            for start, view in zip(self._view_starts(), self.views, strict=True)
            for local_id in view.patches_touching(box_image)
        ]

    @property
    def finest_patch_image(self) -> tuple[float, float]:
        """(width, height) in image pixels of the smallest patch of any view."""
        return min((view.patch_size_image for view in self.views), key=lambda size: size[0] * size[1])

    def patch_lines_image(self) -> tuple[list[float], list[float]]:
        """x and y positions, in image pixels, of the patch boundaries of the view(s) with the
        finest patches (for drawing a grid; a coarse global view would only clutter it)."""
        finest = self.finest_patch_image
        xs: set[float] = set()
        ys: set[float] = set()
        for view in self.views:
            if view.patch_size_image != finest:
                continue
            x0, y0 = view.region_image[:2]
            rows, columns = view.grid_shape
            xs.update(x0 + column * finest[0] for column in range(columns + 1))
            ys.update(y0 + row * finest[1] for row in range(rows + 1))
        return sorted(xs), sorted(ys)


def squash_geometry(image_size: tuple[int, int], grid_shape: tuple[int, int]) -> ImageGeometry:
    """The whole image resized to the model's input without keeping its aspect (BLIP)."""
    width, height = image_size
    return ImageGeometry(image_size, (View((0.0, 0.0, float(width), float(height)), grid_shape),))


def centre_crop_geometry(image_size: tuple[int, int], model_size: tuple[int, int], patch_size: int) -> ImageGeometry:
    """The short side resized to the model's input, then the centre cropped out (CLIP,
    LLaVA-1.5): the margins of a non-square image are never seen.

    Args:
        image_size: (width, height) of the original image.
        model_size: (height, width) of the crop in model pixels.
        patch_size: side of one patch in model pixels.
    """
    image_width, image_height = image_size
    model_height, model_width = model_size
    scale = max(model_width / image_width, model_height / image_height)
    crop_width, crop_height = model_width / scale, model_height / scale
    x0, y0 = (image_width - crop_width) / 2, (image_height - crop_height) / 2
    view = View((x0, y0, x0 + crop_width, y0 + crop_height), (model_height // patch_size, model_width // patch_size))
    return ImageGeometry(image_size, (view,))


def aspect_resize_geometry(
    image_size: tuple[int, int], resized_size: tuple[int, int], patch_size: int
) -> ImageGeometry:
    """The whole image resized, its aspect about kept, to ``resized_size`` (height, width) in
    multiples of ``patch_size`` (Qwen2-VL's ``smart_resize``): one view, its grid from that size."""
    width, height = image_size
    resized_height, resized_width = resized_size
    grid_shape = (resized_height // patch_size, resized_width // patch_size)
    return ImageGeometry(image_size, (View((0.0, 0.0, float(width), float(height)), grid_shape),))


def tiled_geometry(
    image_size: tuple[int, int],
    tiles: tuple[int, int],
    tile_grid: tuple[int, int],
    global_grid: tuple[int, int] | None,
) -> ImageGeometry:
    """The image cut into ``tiles`` (rows, columns) of equal size, each seen as a ``tile_grid``
    of patches, then (SmolVLM, LLaVA-NeXT) the whole image once more as a global view."""
    width, height = image_size
    tile_rows, tile_columns = tiles
    tile_width, tile_height = width / tile_columns, height / tile_rows
    views = [
        View((column * tile_width, row * tile_height, (column + 1) * tile_width, (row + 1) * tile_height), tile_grid)
        for row in range(tile_rows)
        for column in range(tile_columns)
    ]
    if global_grid is not None:
        views.append(View((0.0, 0.0, float(width), float(height)), global_grid))
    return ImageGeometry(image_size, tuple(views))


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



def top_patches(cam_patches: np.ndarray, fraction: float) -> list[int]:
    """Ids of the highest-scoring patches, the top ``fraction`` of all patches (at least one).

    Args:
        cam_patches: (patches,) float heatmap.
        fraction: share of patches to return, in (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = np.asarray(cam_patches, dtype=np.float64).ravel()
    count = max(1, round(fraction * flat.size))
    # Stable sort so equal scores keep a reproducible (row-major) order.
    return sorted(np.argsort(-flat, kind="stable")[:count].tolist())


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
    geometry: ImageGeometry,
    patch_ids: Sequence[int],
    fill: FillMode | Colour = "black",
    *,
    seed: int = 0,
) -> Image.Image:
    """Return a copy of ``image`` with the given patches' pixels replaced by ``fill``."""
    boxes = [geometry.patch_box_image(patch_id) for patch_id in patch_ids]
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
