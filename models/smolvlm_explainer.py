"""SmolVLM (and Idefics3, the same architecture): image tokens written into a language model.

What differs from the other families:
- The processor resizes the image's long side, stretches it to whole tiles (multiples of the
  vision tower's image size), cuts it into rows x columns tiles and adds the whole image once
  more as a global view; ``pixel_values`` are (batch, tiles + 1, 3, S, S), tiles row-major,
  the global view last.
- The vision tower (SigLIP-like) has no CLS token: every vision token is a patch.
- The connector's pixel shuffle folds each scale_factor x scale_factor block of patches into
  one image token, row-major over blocks; the image tokens stand in the language model's
  sequence tile after tile, the global view last, so the sequence order is the pixel order.
- There is no cross-attention: a word's row of the language model's self-attention, at the
  image-token columns, plays its part. Attention probabilities need eager attention.
- Captions come from an instruct chat template, so only the answer is explainable.

transformers' ``SmolVLMProcessor`` insists on a video processor (torchvision) and on
``num2words``; ``SmolVLMImageTextProcessor`` is the image-only half: the image processor, the
tokenizer and its chat template, and the same expansion of ``<image>`` into tile tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Idefics3ForConditionalGeneration,
    SmolVLMForConditionalGeneration,
)
from transformers.models.smolvlm.image_processing_pil_smolvlm import (
    MAX_IMAGE_SIZE,
    _resize_output_size_rescale_to_max_len,
    _resize_output_size_scale_below_upper_bound,
)
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

from models.cam_methods import hires_cam
from models.denormals import in_denormal_mode
from models.explainer import (
    DEFAULT_INSTRUCTION,
    INSTRUCTION_HELP,
    INSTRUCTION_LABEL,
    TILED_VISION_LABELS,
    Caption,
    CaptionerExplainer,
    LayerRelevance,
    Method,
    OcclusionMethod,
    image_token_attention_relevance,
    language_attention_methods,
    occlude_view_patches,
    projector_method,
    switch_to_eager_attention,
    tiled_token_relevance,
    vision_layer_methods,
)
from utils.patch_utils import ImageGeometry, squash_geometry, tiled_geometry

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
MAX_TILE_SIDE = 6  # the tokenizer's <row_i_col_j> tokens go up to 6 x 6



class SmolVLMImageTextProcessor:
    """SmolVLM's processor without its video half: image processor, tokenizer, chat template.

    ``from_pretrained`` reads a checkpoint folder as saved by ``SmolVLMProcessor`` (a video
    processor section in it is ignored) or by ``save_pretrained`` here.
    """

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ValueError("this SmolVLM checkpoint has no chat template")

    @classmethod
    def from_pretrained(cls, folder, backend: str = "pil", **kwargs):
        folder = Path(folder)
        image_processor = AutoImageProcessor.from_pretrained(folder, backend=backend)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        chat_template = None
        if (folder / "chat_template.jinja").is_file():
            chat_template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").is_file():
            chat_template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        return cls(image_processor, tokenizer, chat_template)

    def save_pretrained(self, folder) -> None:
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (Path(folder) / "chat_template.jinja").write_text(self.chat_template)

    def prompt_text(self, instruction: str) -> str:
        """The chat template's text for one user turn (an image, then the instruction), ending
        where the assistant's answer begins."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )


def _longest_edge(size) -> int:
    return int(size["longest_edge"])


class SmolVLMExplainer(CaptionerExplainer):
    """SmolVLM (``SmolVLMForConditionalGeneration``) explained word by word."""

    model_class = SmolVLMForConditionalGeneration
    processor_class = SmolVLMImageTextProcessor
    model_types = ("smolvlm",)
    demo_component = "blip"  # no bundled SmolVLM demo: "shapes-demo" stays BLIP
    default_method = "attention_contrast"
    prompt_label = INSTRUCTION_LABEL
    prompt_help = INSTRUCTION_HELP
    text_is_answer_only = True

    def __init__(self, model, processor, device=None, flush_denormals: bool = True):
        # SDPA returns no attention probabilities; only the language model needs them.
        switch_to_eager_attention(model, ["text_config"])
        inner = model.model
        vision = inner.vision_model
        # The last layer's raw output feeds only the post-LayerNorm, whose input gradient is
        # orthogonal to its input (gradient x activation is zero there): read its output instead.
        self.vision_layers = [*vision.encoder.layers[:-1], vision.post_layernorm]
        self.attentions = [layer.self_attn for layer in inner.text_model.layers]
        self.patch_size = model.config.vision_config.patch_size
        self.scale_factor = model.config.scale_factor
        self.tile_size = model.config.vision_config.image_size  # S: side of a tile in model pixels
        self.tile_grid = (self.tile_size // self.patch_size,) * 2  # patches of one tile (rows, columns)
        processor_tile = _longest_edge(processor.image_processor.max_image_size)
        if processor_tile != self.tile_size:
            raise ValueError(
                f"the image processor cuts {processor_tile} px tiles but the vision tower reads {self.tile_size} px"
            )
        self.tokens_per_tile = (self.tile_grid[0] // self.scale_factor) * (self.tile_grid[1] // self.scale_factor)
        self.image_token_id = model.config.image_token_id
        tokenizer = processor.tokenizer
        image_tokens = [IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, END_OF_UTTERANCE] + [
            f"<row_{row}_col_{column}>" for row in range(1, MAX_TILE_SIDE + 1) for column in range(1, MAX_TILE_SIDE + 1)
        ]
        known = {tokenizer.convert_tokens_to_ids(token) for token in image_tokens} - {None}
        self.special_ids = frozenset(tokenizer.all_special_ids) | known | {self.image_token_id}
        super().__init__(model, processor, device, flush_denormals)

    # ------------------------------------------------------------ geometry

    def tile_layout(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of tiles the image processor cuts an image of (width, height) into;
        (0, 0) when it sends the global view alone. Mirrors the processor's own arithmetic
        (resize the long side, stretch to whole tiles, split) without touching pixels."""
        image_processor = self.processor.image_processor
        if not image_processor.do_image_splitting:
            return 0, 0
        tile = _longest_edge(image_processor.max_image_size)
        width, height = image_size
        if image_processor.do_resize:
            height, width = _resize_output_size_rescale_to_max_len(
                height, width, max_len=_longest_edge(image_processor.size)
            )
            height, width = _resize_output_size_scale_below_upper_bound(height, width, max_len=MAX_IMAGE_SIZE)
        aspect = width / height
        if width >= height:
            width = math.ceil(width / tile) * tile
            height = math.ceil(int(width / aspect) / tile) * tile
        else:
            height = math.ceil(height / tile) * tile
            width = math.ceil(int(height * aspect) / tile) * tile
        if height > tile or width > tile:
            return height // tile, width // tile
        return 0, 0

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """Tiles row-major, then the global view, each a grid of vision patches (an image
        token covers scale_factor x scale_factor of them; its value goes to each)."""
        tiles = self.tile_layout(image_size)
        if tiles == (0, 0):
            return squash_geometry(image_size, self.tile_grid)
        return tiled_geometry(image_size, tiles, self.tile_grid, self.tile_grid)

    def tokens_to_patches(self, token_values: torch.Tensor) -> torch.Tensor:
        """(..., tiles x tokens_per_tile) values of image tokens in sequence order -> (..., tiles x
        patches_per_tile) in patch order: undoes the pixel shuffle, where token (r, c) of a tile
        covers patch rows r*s .. r*s+s-1 and columns c*s .. c*s+s-1."""
        scale = self.scale_factor
        rows, columns = self.tile_grid[0] // scale, self.tile_grid[1] // scale
        leading = token_values.shape[:-1]
        grid = token_values.reshape(*leading, -1, rows, columns)
        grid = grid.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        return grid.reshape(*leading, -1)

    # ------------------------------------------------------------ methods

    def spread_to_patches(self, per_token: LayerRelevance) -> LayerRelevance:
        """A relevance per image token (in sequence order) spread to the patches each covers."""

        def relevance(activation, gradients, caption, word_indices):
            return self.tokens_to_patches(per_token(activation, gradients, caption, word_indices))

        return relevance

    def build_methods(self) -> dict[str, Method]:
        # Gradient x attention from the rows that predict each word (row t - 1 predicts id t)
        # to the image-token columns, summed over the word's pieces, averaged over heads.
        attention_methods = language_attention_methods(
            self.attentions, self.spread_to_patches(image_token_attention_relevance(self.image_token_id))
        )
        vision_methods = vision_layer_methods(self.vision_layers, tiled_token_relevance, labels=TILED_VISION_LABELS)
        # The connector's output, (tiles, tokens per tile, D): the image tokens in sequence order.
        projector = projector_method(
            self.model.model.connector, self.spread_to_patches(tiled_token_relevance(hires_cam))
        )
        return {**attention_methods, **vision_methods, "projector": projector, "occlusion": OcclusionMethod()}

    def vision_tower_layers(self) -> Sequence[nn.Module]:
        return self.model.model.vision_model.encoder.layers

    # ------------------------------------------------------------ inputs and forward passes

    def model_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        processed = self.processor.image_processor(images=[[image] for image in images], return_tensors="pt")
        return {
            "pixel_values": processed["pixel_values"].to(self.device),
            "pixel_attention_mask": processed["pixel_attention_mask"].to(self.device),
        }

    def teacher_forced_logits(
        self, inputs: dict[str, torch.Tensor], ids: torch.Tensor, first_row: int = 0
    ) -> torch.Tensor:
        return self.model(
            input_ids=ids,
            pixel_values=inputs["pixel_values"],
            pixel_attention_mask=inputs["pixel_attention_mask"],
            use_cache=False,
            logits_to_keep=ids.shape[1] - first_row,
        ).logits

    def occluded_inputs(self, inputs: dict[str, torch.Tensor], blocks: Sequence[Sequence[int]]) -> dict:
        """Pixels (1, tiles, 3, S, S) repeated once per block, the block's patches set to zero
        (the normalised mean) in the tile each belongs to (patch ids: tile after tile, as the
        tokens)."""
        patch_ids = range(inputs["pixel_values"].shape[1] * self.tile_grid[0] * self.tile_grid[1])
        occluded = occlude_view_patches(inputs["pixel_values"], blocks, patch_ids, self.tile_grid[1], self.patch_size)
        mask = inputs["pixel_attention_mask"].repeat(len(blocks), 1, 1, 1)
        return {**inputs, "pixel_values": occluded, "pixel_attention_mask": mask}

    def prompt_ids(self, image: Image.Image, instruction: str) -> list[int]:
        """The ids before the answer: chat template, instruction and the image's tile tokens."""
        rows, columns = self.tile_layout(image.size)
        image_text = get_image_prompt_string(
            rows,
            columns,
            self.tokens_per_tile,
            fake_token_around_image=FAKE_IMAGE_TOKEN,
            image_token=IMAGE_TOKEN,
            global_image_token=GLOBAL_IMAGE_TOKEN,
        )
        text = self.processor.prompt_text(instruction).replace(IMAGE_TOKEN, image_text, 1)
        return self.processor.tokenizer(text).input_ids

    @in_denormal_mode
    @torch.no_grad()
    def caption(
        self, image: Image.Image, prompt: str = "", max_new_tokens: int = 30, num_beams: int = 1
    ) -> Caption:
        """Answer ``prompt`` (the instruction; DEFAULT_INSTRUCTION when empty) about the image."""
        prompt_ids = self.prompt_ids(image, prompt.strip() or DEFAULT_INSTRUCTION)
        inputs = self.model_inputs([image])
        image_tokens = prompt_ids.count(self.image_token_id)
        tiles = inputs["pixel_values"].shape[1]
        if image_tokens != tiles * self.tokens_per_tile:
            raise RuntimeError(f"{image_tokens} image tokens for {tiles} tiles of {self.tokens_per_tile} tokens")
        input_ids = torch.tensor([prompt_ids], device=self.device)
        generated = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **inputs,
            max_new_tokens=self.new_token_budget(len(prompt_ids), max_new_tokens),
            num_beams=num_beams,
            do_sample=False,
        )
        return self.caption_from_ids(generated[0].tolist(), len(prompt_ids))


class Idefics3Explainer(SmolVLMExplainer):
    """Idefics3 (``Idefics3ForConditionalGeneration``): SmolVLM's architecture under its first name."""

    model_class = Idefics3ForConditionalGeneration
    model_types = ("idefics3",)
