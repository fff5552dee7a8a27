"""BLIP: an image encoder read by a text decoder through cross-attention.

What differs from the other families: BLIP squashes any image to the processor's size (aspect
not kept), its vision tokens start with a CLS token, and ``generate()`` puts BOS ("[DEC]") first
while the forward pass does not insert it, so the generated ids go back in as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, BlipForConditionalGeneration

from models.denormals import in_denormal_mode
from models.explainer import (
    Caption,
    CaptionerExplainer,
    Method,
    OcclusionMethod,
    attention_row_relevance,
    cross_attention_methods,
    patch_token_relevance,
    vision_layer_methods,
)
from utils.patch_utils import ImageGeometry, squash_geometry


class BlipExplainer(CaptionerExplainer):
    """BLIP captioning (``BlipForConditionalGeneration``) explained word by word."""

    model_class = BlipForConditionalGeneration
    processor_class = AutoProcessor
    model_types = ("blip",)
    demo_component = "blip"
    # Measured best on the shapes benchmark (bench/faithfulness.py, README), shown at its last
    # map, the mean over all decoder layers.
    default_method = "cross_attention_softmax"
    prompt_label = "Prompt (conditional captioning)"
    prompt_help = "The caption starts with these words and the model goes on; empty: a caption of its own."

    def __init__(self, model: BlipForConditionalGeneration, processor, device=None, flush_denormals: bool = True):
        # The last layer's raw output feeds only the final LayerNorm, and a LayerNorm's input
        # gradient is orthogonal to its input, so gradient x activation summed over channels is
        # exactly zero there. Its normalised output is what the decoder reads: use that instead.
        self.vision_layers = [*model.vision_model.encoder.layers[:-1], model.vision_model.post_layernorm]
        self.cross_attentions = [layer.crossattention.self for layer in model.text_decoder.bert.encoder.layer]
        # BLIP's BOS ("[DEC]") is not always registered as special with the tokenizer.
        self.special_ids = frozenset(processor.tokenizer.all_special_ids) | {model.config.text_config.bos_token_id}
        self.patch_size = model.config.vision_config.patch_size
        size = processor.image_processor.size
        self.grid_shape = (size["height"] // self.patch_size, size["width"] // self.patch_size)
        super().__init__(model, processor, device, flush_denormals)

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        return squash_geometry(image_size, self.grid_shape)

    def build_methods(self) -> dict[str, Method]:
        vision_methods = vision_layer_methods(
            self.vision_layers, lambda cam: patch_token_relevance(cam, first_patch_token=1)  # after CLS
        )
        cross_attention = cross_attention_methods(
            self.cross_attentions, lambda pooling: attention_row_relevance(first_patch_key=1, pooling=pooling)
        )
        return {**vision_methods, **cross_attention, "occlusion": OcclusionMethod()}

    def vision_tower_layers(self) -> Sequence[nn.Module]:
        return self.model.vision_model.encoder.layers

    @in_denormal_mode
    @torch.no_grad()
    def caption(
        self, image: Image.Image, prompt: str = "", max_new_tokens: int = 30, num_beams: int = 1
    ) -> Caption:
        pixel_values = self.pixel_values([image])
        prompt_ids = None
        prompt_length = 1  # BOS only
        if prompt.strip():
            prompt_ids = self.processor.tokenizer(prompt.strip(), return_tensors="pt").input_ids.to(self.device)
            prompt_length = prompt_ids.shape[1] - 1  # generate() drops the trailing [SEP]
        generated = self.model.generate(
            pixel_values=pixel_values,
            input_ids=prompt_ids,
            max_new_tokens=self.new_token_budget(prompt_length, max_new_tokens),
            num_beams=num_beams,
            do_sample=False,
        )
        return self.caption_from_ids(generated[0].tolist(), prompt_length)
