"""BLIP-2: a ViT whose tokens a Q-Former reads into a few learned queries, which are projected and
written into a decoder-only language model's sequence (OPT) at the image-token positions.

What differs from the other families:
- The language model never sees a patch: it reads ``num_query_tokens`` (32) query tokens,
  written first in the sequence (``<image>`` ids), then BOS (``</s>`` for OPT), the prompt and
  the caption, all one teacher-forced sequence where position ``p - 1`` scores the id at ``p``.
- The queries reach the patches through the Q-Former's cross-attention, which sits on every
  ``cross_attention_frequency``-th (second) Q-Former layer. The query-composed map takes the
  gradient-weighted attention of the language model from each word's rows to the query columns
  (the mean over its layers), and carries it to the patches through each cross-attention
  layer's attention (heads averaged): one map per cross-attention layer, then their mean.
  The Q-Former cross-attention map is gradient x that attention itself, summed over queries.
- The processor squashes any image to its size (224 x 224), the vision tokens start with CLS,
  and the last vision layer's raw output feeds only the final LayerNorm (the same trap as BLIP):
  its normalised output is what the Q-Former reads, and what the vision methods read there.
- Only decoder-only language models (OPT); the Flan-T5 checkpoints (an encoder-decoder) are
  refused with a message.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, Blip2ForConditionalGeneration

from models.cam_methods import gradient_attention
from models.denormals import in_denormal_mode
from models.explainer import (
    Caption,
    CaptionerExplainer,
    GradientMethod,
    LayerRelevance,
    Method,
    OcclusionMethod,
    attention_layers_method,
    image_token_attention_relevance,
    patch_token_relevance,
    special_token_ids,
    switch_to_eager_attention,
    vision_layer_methods,
)
from utils.patch_utils import ImageGeometry, squash_geometry


def query_cross_attention_relevance(attention, gradients, caption, word_indices) -> torch.Tensor:
    """(words, patches): gradient x a Q-Former cross-attention layer's probabilities, averaged
    over heads and summed over the queries, after the CLS key.
    ``attention`` (1, H, queries, 1 + patches), ``gradients`` (W, 1, H, queries, 1 + patches)."""
    per_query = gradient_attention(attention[0].transpose(0, 1), gradients[:, 0].transpose(1, 2))  # (W, Q, keys)
    return per_query.sum(dim=1)[:, 1:]


class Blip2Explainer(CaptionerExplainer):
    """BLIP-2 captioning (``Blip2ForConditionalGeneration`` with OPT) explained word by word.

    The language model and the Q-Former are switched to eager attention on construction (the
    model is then this explainer's), and refused if that fails (MissingCaptureError).
    """

    model_class = Blip2ForConditionalGeneration
    processor_class = AutoProcessor
    model_types = ("blip-2",)
    demo_component = "blip"  # no bundled BLIP-2 demo: "shapes-demo" stays the BLIP one
    default_method = "queries"
    prompt_label = "Prompt"
    prompt_help = (
        "The caption continues these words (“a photo of”, or “Question: … Answer:”); "
        "empty: a caption of its own."
    )

    def __init__(self, model: Blip2ForConditionalGeneration, processor, device=None, flush_denormals: bool = True):
        config = model.config
        if not config.use_decoder_only_language_model:
            raise ValueError(
                f"BLIP-2 with a {config.text_config.model_type} (encoder-decoder) language model is not "
                "supported: choose an OPT checkpoint such as Salesforce/blip2-opt-2.7b"
            )
        switch_to_eager_attention(model, ["text_config", "qformer_config"])
        self.image_token_id = config.image_token_id
        self.query_count = config.num_query_tokens
        vision_model = model.vision_model
        # As in BLIP: the last layer's raw output reaches the Q-Former only through the final
        # LayerNorm, whose input gradient is orthogonal to its input; read its output instead.
        self.vision_layers = [*vision_model.encoder.layers[:-1], vision_model.post_layernorm]
        self.cross_attentions = [
            layer.crossattention.attention for layer in model.qformer.encoder.layer if layer.has_cross_attention
        ]
        self.language_attentions = [layer.self_attn for layer in model.language_model.get_decoder().layers]
        self.special_ids = special_token_ids(processor.tokenizer, config.text_config, self.image_token_id)
        self.patch_size = config.vision_config.patch_size
        size = processor.image_processor.size
        self.grid_shape = (size["height"] // self.patch_size, size["width"] // self.patch_size)
        super().__init__(model, processor, device, flush_denormals)

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        return squash_geometry(image_size, self.grid_shape)

    def build_methods(self) -> dict[str, Method]:
        count = len(self.cross_attentions)
        cross_names = tuple(f"Q-Former cross-attention {index + 1}/{count}" for index in range(count))
        queries = GradientMethod(
            "Language model attention to the queries, through the Q-Former's cross-attention",
            (*self.language_attentions, *self.cross_attentions),
            tuple(f"queries through {name}" for name in cross_names),
            None,
            output_index=1,  # (output, attention probabilities) in both
            pooled_name=f"queries through the Q-Former, mean of all {count} cross-attention layers",
            compose=self.compose_query_maps,
        )
        qformer = attention_layers_method(
            "Gradient x cross-attention, Q-Former layers", "Q-Former cross-attention",
            self.cross_attentions, query_cross_attention_relevance,
        )
        vision_methods = vision_layer_methods(
            self.vision_layers, lambda cam: patch_token_relevance(cam, first_patch_token=1)  # after CLS
        )
        return {"queries": queries, "qformer": qformer, **vision_methods, "occlusion": OcclusionMethod()}

    @property
    def query_relevance(self) -> LayerRelevance:
        """(words, queries): gradient x the language model's attention from each word's rows to
        the query columns of its sequence."""
        return image_token_attention_relevance(self.image_token_id)

    def compose_query_maps(self, captured, gradients, caption, word_indices) -> list[torch.Tensor]:
        """One (words, patches) map per Q-Former cross-attention layer: the words' query
        relevance (mean over the language model's layers) times that layer's attention from
        each query to each patch (heads averaged, CLS dropped)."""
        language_layers = len(self.language_attentions)
        query_relevance = torch.stack([
            self.query_relevance(attention, gradient, caption, word_indices)
            for attention, gradient in zip(captured[:language_layers], gradients[:language_layers], strict=True)
        ]).mean(dim=0)  # (W, queries)
        return [
            query_relevance @ attention[0].mean(dim=0)[:, 1:].to(query_relevance.dtype)  # (W, Q) @ (Q, patches)
            for attention in captured[language_layers:]
        ]

    def vision_tower_layers(self) -> Sequence[nn.Module]:
        return self.model.vision_model.encoder.layers

    @in_denormal_mode
    @torch.no_grad()
    def caption(
        self, image: Image.Image, prompt: str = "", max_new_tokens: int = 30, num_beams: int = 1
    ) -> Caption:
        """Caption the image, continuing ``prompt`` when given; the query ids, BOS and the prompt
        are never words."""
        # Typed "<image>" would ask for a second set of queries.
        text = prompt.replace(self.processor.image_token.content, " ").strip()
        inputs = self.processor(images=[image], text=text, return_tensors="pt")
        prompt_ids = inputs["input_ids"].to(self.device)
        generated = self.model.generate(
            pixel_values=inputs["pixel_values"].to(self.device, self.model.dtype),
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=self.new_token_budget(prompt_ids.shape[1], max_new_tokens),
            num_beams=num_beams,
            do_sample=False,
            suppress_tokens=[self.image_token_id],
        )
        return self.caption_from_ids(generated[0].tolist(), prompt_ids.shape[1])
