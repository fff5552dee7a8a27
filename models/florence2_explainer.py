"""Florence-2: a DaViT vision tower whose tokens a BART encoder reads with the task prompt, and a
decoder that cross-attends to the encoder's output (like BLIP's decoder to its vision tokens).

What differs from the other families:
- The encoder reads image tokens and then the prompt: the projector writes one token of the
  mean of all patches, then one token per patch of the last stage's grid (row-major), at the
  ``<image>`` positions; then ``<s>``, the task's question (the processor rewrites
  ``<CAPTION>`` as "What does the image describe?") and ``</s>``.
- The decoder is a separate sequence: ``generate`` returns ``</s>`` (the decoder's start id),
  ``<s>``, the caption and ``</s>``. A Caption's ids are the encoder's text ids followed by
  the decoder's ids: the explanation's forward pass rebuilds the encoder's input from the
  first part (the image ids go back in front) and teacher-forces the second. Position
  ``p - 1`` scores the id at ``p`` inside the decoder's part; the encoder's positions predict
  nothing (NaN logits), and are never words.
- The vision tower is a DaViT with stages of halving resolution (stride 4, then 2 per stage;
  192, 96, 48 and 24 tokens per side at 768 px): a stage's map is averaged onto the grid of
  the encoder's patch tokens, the patches every other method explains. The last stage's raw
  output reaches the words only through a linear map and a LayerNorm (gradient x activation
  there is mostly position-embedding terms): its projected, normalised tokens are read instead.
- The processor squashes any image to its size (768 x 768 for Florence-2-base), as BLIP's does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoProcessor, Florence2ForConditionalGeneration

from models.denormals import in_denormal_mode
from models.explainer import (
    Caption,
    CaptionerExplainer,
    LayerRelevance,
    Method,
    OcclusionMethod,
    attention_row_relevance,
    cross_attention_methods,
    special_token_ids,
    switch_to_eager_attention,
    vision_layer_methods,
)
from utils.patch_utils import ImageGeometry, squash_geometry

# The captioning tasks, in the page's order; the first is the default.
CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
TASK_TOKEN = re.compile(r"<[A-Z_]+>")


def token_grid_relevance(cam, grid_shape: tuple[int, int]) -> LayerRelevance:
    """A CAM formula (models.cam_methods) on a DaViT stage's (1, C, H, W) feature map, averaged
    onto the encoder's (rows, columns) token grid; or on the projected image tokens
    (1, 1 + patches, D), after the first one (the mean of all patches, as a CLS token)."""

    def relevance(activation, gradients, caption, word_indices):
        if activation.dim() == 3:  # projected tokens
            return cam(activation[:, 1:], gradients[:, :, 1:])[:, 0]
        tokens = activation.flatten(2).transpose(1, 2)  # (1, H*W, C)
        token_gradients = gradients.flatten(3).transpose(2, 3)  # (W, 1, H*W, C)
        stage_map = cam(tokens, token_gradients)[:, 0].unflatten(-1, activation.shape[-2:])  # (words, H, W)
        return F.adaptive_avg_pool2d(stage_map, grid_shape).flatten(1)  # (W, rows * columns)

    return relevance


def decoder_rows_relevance(relevance: LayerRelevance, encoder_length) -> LayerRelevance:
    """``relevance`` of a decoder's attention, whose query rows count from the decoder's first
    id: each word's positions are moved back by the length of the caption's encoder part.

    Args:
        relevance: reads rows ``word.start - 1`` to ``word.end - 1`` (attention_row_relevance).
        encoder_length: (caption ids) -> how many of them are the encoder's text.
    """

    def shifted(attention, gradients, caption, word_indices):
        offset = encoder_length(caption.token_ids)
        words = tuple(replace(word, start=word.start - offset, end=word.end - offset) for word in caption.words)
        return relevance(attention, gradients, replace(caption, words=words), word_indices)

    return shifted


class Florence2Explainer(CaptionerExplainer):
    """Florence-2 captioning (``Florence2ForConditionalGeneration``) explained word by word.

    The BART model is switched to eager attention on construction (the model is then this
    explainer's), and refused if that fails (MissingCaptureError): the decoder's cross-attention
    is the default method.
    """

    model_class = Florence2ForConditionalGeneration
    processor_class = AutoProcessor
    model_types = ("florence2",)
    demo_component = "blip"  # no bundled Florence-2 demo: "shapes-demo" stays the BLIP one
    # BLIP's default, for the same architecture of reading: the decoder cross-attends to the image.
    default_method = "cross_attention_softmax"
    prompt_label = "Task"
    prompt_help = (
        "Florence-2 captions by task: a short caption, a detailed one, or a paragraph."
    )
    prompt_choices = CAPTION_TASKS
    text_is_answer_only = True

    def __init__(self, model: Florence2ForConditionalGeneration, processor, device=None, flush_denormals: bool = True):
        config = model.config
        switch_to_eager_attention(model, ["text_config"])
        image_processor = processor.image_processor
        if getattr(image_processor, "do_center_crop", False) or "height" not in image_processor.size:
            raise ValueError("only Florence-2's squash-to-size image processing is supported")
        self.image_token_id = config.image_token_id
        self.image_token_count = processor.num_image_tokens  # the mean token, then the patches
        self.patch_size = math.prod(config.vision_config.patch_stride)  # model pixels per encoder token
        size = image_processor.size
        self.grid_shape = (size["height"] // self.patch_size, size["width"] // self.patch_size)
        if self.grid_shape[0] * self.grid_shape[1] + 1 != self.image_token_count:
            raise ValueError(
                f"the processor writes {self.image_token_count} image tokens, but a {size} image "
                f"makes a {self.grid_shape} grid of patches plus their mean"
            )
        tower = model.model.vision_tower
        self.vision_layers = [
            *(stage[-1] for stage in tower.blocks[:-1]),
            model.model.multi_modal_projector.image_proj_norm,
        ]
        self.cross_attentions = [layer.encoder_attn for layer in model.model.language_model.decoder.layers]
        self.eos_token_id = config.text_config.eos_token_id
        self.special_ids = special_token_ids(processor.tokenizer, config.text_config, self.image_token_id)
        super().__init__(model, processor, device, flush_denormals)

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        return squash_geometry(image_size, self.grid_shape)

    def build_methods(self) -> dict[str, Method]:
        stages = len(self.vision_layers)
        names = (
            *(f"vision stage {index + 1}/{stages}" for index in range(stages - 1)),
            f"vision stage {stages}/{stages}, projected image tokens",
        )
        vision_methods = vision_layer_methods(
            self.vision_layers, lambda cam: token_grid_relevance(cam, self.grid_shape), layer_names=names
        )
        patches = self.grid_shape[0] * self.grid_shape[1]
        # Encoder keys: the mean token, the patches, then the prompt's text.
        cross_attention = cross_attention_methods(
            self.cross_attentions,
            lambda pooling: decoder_rows_relevance(
                attention_row_relevance(first_patch_key=1, patch_count=patches, pooling=pooling), self.encoder_length
            ),
        )
        return {**cross_attention, **vision_methods, "occlusion": OcclusionMethod()}

    def vision_tower_layers(self) -> Sequence[nn.Module]:
        return [block for stage in self.model.model.vision_tower.blocks for block in stage]

    def encoder_length(self, token_ids: Sequence[int]) -> int:
        """How many of a Caption's ids are the encoder's text: up to its first ``</s>``."""
        ids = [int(token_id) for token_id in token_ids]
        if self.eos_token_id not in ids:
            raise ValueError("these ids hold no encoder prompt ending in </s>: they are no Florence-2 caption")
        return ids.index(self.eos_token_id) + 1

    def teacher_forced_logits(
        self, inputs: dict[str, torch.Tensor], ids: torch.Tensor, first_row: int = 0
    ) -> torch.Tensor:
        """(batch, ids - first_row, vocabulary): the decoder's logits over its part of the ids,
        as they are, from row ``first_row`` of the whole sequence on; rows of the encoder's text
        ids (read, never predicted) are NaN."""
        encoder_length = self.encoder_length(ids[0].tolist())
        image_ids = ids.new_full((ids.shape[0], self.image_token_count), self.image_token_id)
        logits = self.model(
            input_ids=torch.cat([image_ids, ids[:, :encoder_length]], dim=1),
            pixel_values=inputs["pixel_values"],
            decoder_input_ids=ids[:, encoder_length:],
        ).logits  # (B, T - E, V): the decoder's row j is the sequence's row E + j
        if first_row >= encoder_length:
            return logits[:, first_row - encoder_length :]
        unscored = logits.new_full((ids.shape[0], encoder_length - first_row, logits.shape[-1]), math.nan)
        return torch.cat([unscored, logits], dim=1)

    def prompt_inputs(self, image: Image.Image, task: str) -> dict[str, torch.Tensor]:
        """The processor's input ids (image ids, ``<s>``, the task's question, ``</s>``) and
        pixel values for one image.

        Raises:
            ValueError: a task token other than the captioning ones, or a prompt that spells
                special tokens.
        """
        if TASK_TOKEN.fullmatch(task) and task not in CAPTION_TASKS:
            raise ValueError(f"Florence-2 is explained as a captioner: choose one of {', '.join(CAPTION_TASKS)}")
        inputs = self.processor(text=task, images=[image], return_tensors="pt")
        text_ids = inputs["input_ids"][0, self.image_token_count :].tolist()
        if text_ids.count(self.eos_token_id) != 1 or self.image_token_id in text_ids:
            raise ValueError("the prompt may not contain special tokens such as </s> or <image>")
        return {name: value.to(self.device) for name, value in inputs.items()}

    @in_denormal_mode
    @torch.no_grad()
    def caption(
        self, image: Image.Image, prompt: str = "", max_new_tokens: int = 30, num_beams: int = 1
    ) -> Caption:
        """Caption the image for a task (``prompt``: one of CAPTION_TASKS, the first when empty);
        only the decoder's words are explainable."""
        inputs = self.prompt_inputs(image, prompt.strip() or CAPTION_TASKS[0])
        generated = self.model.generate(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"].to(self.model.dtype),
            max_new_tokens=self.new_token_budget(1, max_new_tokens),  # after the decoder's start id
            num_beams=num_beams,
            do_sample=False,
            # An image id in the caption would ask for image features the decoder does not read.
            suppress_tokens=[self.image_token_id],
        )
        text_ids = inputs["input_ids"][0, self.image_token_count :].tolist()
        return self.caption_from_ids(text_ids + generated[0].tolist(), len(text_ids) + 1)
