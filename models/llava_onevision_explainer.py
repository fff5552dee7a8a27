"""LLaVA-OneVision: LLaVA's image tokens in a Qwen2 language model's sequence, from a SigLIP
tower that sees the image as a global view plus tiles ("anyres").

What differs from LLaVA-1.5 (whose captioning, eager attention and chat template it shares):
- The image processor picks the best of ``image_grid_pinpoints`` (a canvas of whole tiles),
  resizes the image into it keeping the aspect, pads it centred, and cuts tiles of ``S`` px;
  ``pixel_values`` are (batch, 1 + tiles, 3, S, S): the whole image squashed to S x S first,
  then the tiles row-major, with ``image_sizes`` (height, width) of the original.
- SigLIP has no CLS token and the conv covers ``(S // patch) * patch`` px of each view (378
  of 384 for the real checkpoints): a view's last pixels are seen by no patch.
- The projector reads every view's patches; then the model packs them: the global view's
  patches, then the tiles' patches as one grid, the rows and columns over the padding cut off
  ("unpad"), bilinearly shrunk when the grid holds more than ``anyres_max_N`` tiles' worth, and
  a learnt newline token after every row. Image-token columns of the language model are in
  that packed order.

Maps are in the geometry's patch order: the global view's patches, then each tile's patches
that survive unpadding (tiles over padding alone are left out). Vision-layer and projector maps
take each patch's own token; attention takes the packed token that holds it (a shrunk grid's
nearest token; newline tokens hold no place on the image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.image_processing_utils import select_best_resolution

from models.cam_methods import hires_cam
from models.explainer import (
    TILED_VISION_LABELS,
    Method,
    OcclusionMethod,
    image_token_attention_relevance,
    language_attention_methods,
    occlude_view_patches,
    projector_method,
    tiled_token_relevance,
    vision_layer_methods,
)
from models.llava_explainer import LlavaExplainer
from utils.patch_utils import ImageGeometry, View

ANYRES_PREFIX = "anyres_max_"


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` with its image processor and tokenizer only: the full one
    insists on a video processor, which needs torchvision (not installable here). A folder
    saved with a video processor section still loads: only the sections named here are read."""

    # The settings are named here (not left in **kwargs) so that save_pretrained writes them.
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


@dataclass(frozen=True)
class AnyresLayout:
    """Where one image's views and packed image tokens lie (all sizes from the processor's and
    the model's own arithmetic, never from pixels).

    Args:
        image_size: (width, height) of the original image.
        tiles: (rows, columns) of tiles on the canvas.
        resized: (height, width) of the image on the canvas, in model pixels.
        offset: (top, left) padding before the image on the canvas, in model pixels.
        kept_rows, kept_columns: the rows and columns of the tiles' whole patch grid that
            unpadding keeps.
        packed_shape: (rows, columns) of the packed tile tokens (newlines aside), after the
            shrink when there is one.
    """

    image_size: tuple[int, int]
    tiles: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    kept_rows: range
    kept_columns: range
    packed_shape: tuple[int, int]


class LlavaOnevisionExplainer(LlavaExplainer):
    """LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``) explained word by word."""

    model_class = LlavaOnevisionForConditionalGeneration
    processor_class = ImageOnlyLlavaOnevisionProcessor
    model_types = ("llava_onevision",)

    def __init__(self, model, processor, device=None, flush_denormals: bool = True):
        config = model.config
        self.pinpoints = [tuple(pinpoint) for pinpoint in config.image_grid_pinpoints]
        self.max_tiles = int(config.vision_aspect_ratio.removeprefix(ANYRES_PREFIX))
        if processor.vision_aspect_ratio != config.vision_aspect_ratio:
            raise ValueError(
                f"the processor counts image tokens for {processor.vision_aspect_ratio!r} but the model packs "
                f"them for {config.vision_aspect_ratio!r}"
            )
        self.grid = config.vision_config.image_size // config.vision_config.patch_size  # patches a view side
        super().__init__(model, processor, device, flush_denormals)
        if config.vision_config.image_size != self.tile_size:
            raise ValueError(
                f"the image processor cuts {self.tile_size} px views but the vision tower reads "
                f"{config.vision_config.image_size} px"
            )

    def read_image_processing(self, image_processor) -> None:
        size = image_processor.size
        if getattr(image_processor, "do_center_crop", False) or size.get("height") != size.get("width"):
            raise ValueError("only LLaVA-OneVision's square views of a padded tile canvas are supported")
        if [tuple(pinpoint) for pinpoint in image_processor.image_grid_pinpoints] != self.pinpoints:
            raise ValueError("the image processor's image_grid_pinpoints differ from the model's")
        self.tile_size = size["height"]

    # ------------------------------------------------------------ geometry

    def layout(self, image_size: tuple[int, int]) -> AnyresLayout:
        """The processor's canvas and the model's unpadding and shrink, for an image of
        (width, height): the arithmetic of ``select_best_resolution``, ``get_patch_output_size``,
        the processor's centred padding, ``unpad_image`` and ``pack_image_features``."""
        width, height = image_size
        best_height, best_width = select_best_resolution((height, width), self.pinpoints)
        if best_width / width < best_height / height:
            resized = (min(math.ceil(height * best_width / width), best_height), best_width)
        else:
            resized = (best_height, min(math.ceil(width * best_height / height), best_width))
        offset = ((best_height - resized[0]) // 2, (best_width - resized[1]) // 2)
        tiles = (best_height // self.tile_size, best_width // self.tile_size)
        rows, columns = tiles[0] * self.grid, tiles[1] * self.grid
        kept_rows, kept_columns = range(rows), range(columns)
        if width / height > columns / rows:
            padding = (rows - int(round(height * (columns / width), 7))) // 2
            kept_rows = range(padding, rows - padding)
        else:
            padding = (columns - int(round(width * (rows / height), 7))) // 2
            kept_columns = range(padding, columns - padding)
        packed_shape = (len(kept_rows), len(kept_columns))
        ratio = math.sqrt(len(kept_rows) * len(kept_columns) / (self.max_tiles * self.grid**2))
        if ratio > 1.1:
            packed_shape = (int(len(kept_rows) // ratio), int(len(kept_columns) // ratio))
        return AnyresLayout(image_size, tiles, resized, offset, kept_rows, kept_columns, packed_shape)

    def kept_tile_patches(self, layout: AnyresLayout) -> list[tuple[int, range, range]]:
        """(tile index, local rows, local columns) of each tile's patches that unpadding keeps,
        tiles row-major, those with none left out."""
        kept = []
        for tile in range(layout.tiles[0] * layout.tiles[1]):
            tile_row, tile_column = divmod(tile, layout.tiles[1])
            rows = range(
                max(layout.kept_rows.start - tile_row * self.grid, 0),
                min(layout.kept_rows.stop - tile_row * self.grid, self.grid),
            )
            columns = range(
                max(layout.kept_columns.start - tile_column * self.grid, 0),
                min(layout.kept_columns.stop - tile_column * self.grid, self.grid),
            )
            if len(rows) and len(columns):
                kept.append((tile, rows, columns))
        return kept

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """The global view (the image squashed to S x S, of which the patches cover the first
        grid x patch px), then each tile's kept patches, from canvas to image coordinates."""
        layout = self.layout(image_size)
        width, height = image_size
        seen = self.grid * self.patch_size / self.tile_size
        views = [View((0.0, 0.0, width * seen, height * seen), (self.grid, self.grid))]
        (resized_height, resized_width), (top, left) = layout.resized, layout.offset
        for tile, rows, columns in self.kept_tile_patches(layout):
            tile_row, tile_column = divmod(tile, layout.tiles[1])
            canvas_x = tile_column * self.tile_size + columns.start * self.patch_size
            canvas_y = tile_row * self.tile_size + rows.start * self.patch_size
            x0, y0 = (canvas_x - left) * width / resized_width, (canvas_y - top) * height / resized_height
            x1 = x0 + len(columns) * self.patch_size * width / resized_width
            y1 = y0 + len(rows) * self.patch_size * height / resized_height
            views.append(View((x0, y0, x1, y1), (len(rows), len(columns))))
        return ImageGeometry(image_size, tuple(views))

    def inputs_layout(self, inputs: dict[str, torch.Tensor]) -> AnyresLayout:
        height, width = (int(value) for value in inputs["image_sizes"][0])
        return self.layout((width, height))

    def vision_token_of_patch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """For each patch of the geometry, its token among the vision tower's (views x grid^2)
        outputs, which the projector keeps in that order."""
        per_view = self.grid**2
        tokens = [torch.arange(per_view)]
        for tile, rows, columns in self.kept_tile_patches(self.inputs_layout(inputs)):
            local = torch.tensor(rows)[:, None] * self.grid + torch.tensor(columns)[None, :]
            tokens.append((1 + tile) * per_view + local.ravel())
        return torch.cat(tokens).to(self.device)

    def image_token_of_patch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """For each patch of the geometry, the packed image token (in sequence order) that holds
        it: the global view's own, then the unpadded grid's (the nearest of a shrunk grid), a
        newline token after each packed row."""
        layout = self.inputs_layout(inputs)
        packed_rows, packed_columns = layout.packed_shape
        tokens = [torch.arange(self.grid**2)]
        for tile, rows, columns in self.kept_tile_patches(layout):
            tile_row, tile_column = divmod(tile, layout.tiles[1])
            row = torch.tensor(rows) + tile_row * self.grid - layout.kept_rows.start
            column = torch.tensor(columns) + tile_column * self.grid - layout.kept_columns.start
            packed_row = row * packed_rows // len(layout.kept_rows)
            packed_column = column * packed_columns // len(layout.kept_columns)
            tokens.append((self.grid**2 + packed_row[:, None] * (packed_columns + 1) + packed_column[None, :]).ravel())
        return torch.cat(tokens).to(self.device)

    # ------------------------------------------------------------ methods

    def build_methods(self) -> dict[str, Method]:
        attention_methods = language_attention_methods(
            self.attention_layers,
            image_token_attention_relevance(self.image_token_id),
            token_of_patch=self.image_token_of_patch,
        )
        vision_methods = vision_layer_methods(
            self.vision_layers,
            tiled_token_relevance,
            labels=TILED_VISION_LABELS,
            token_of_patch=self.vision_token_of_patch,
        )
        # The projector's output per view, before packing: every patch has its own token there.
        projector = projector_method(
            self.model.model.multi_modal_projector,
            tiled_token_relevance(hires_cam),
            token_of_patch=self.vision_token_of_patch,
        )
        return {**attention_methods, **vision_methods, "projector": projector, "occlusion": OcclusionMethod()}

    # ------------------------------------------------------------ inputs and forward passes

    def model_inputs(self, images) -> dict[str, torch.Tensor]:
        batch = self.processor.image_processor(images=list(images), return_tensors="pt")
        sizes = batch["image_sizes"]
        if not bool((sizes == sizes[0]).all()):
            raise ValueError("images of one batch must share one size: each fills the same image tokens")
        return {"pixel_values": batch["pixel_values"].to(self.device), "image_sizes": sizes.to(self.device)}

    def occluded_inputs(self, inputs: dict[str, torch.Tensor], blocks) -> dict:
        """Pixels (1, views, 3, S, S) repeated once per block, each patch of the block zeroed
        (the normalised mean) in the view it belongs to."""
        occluded = occlude_view_patches(
            inputs["pixel_values"], blocks, self.vision_token_of_patch(inputs).tolist(), self.grid, self.patch_size
        )
        return {"pixel_values": occluded, "image_sizes": inputs["image_sizes"].repeat(len(blocks), 1)}
