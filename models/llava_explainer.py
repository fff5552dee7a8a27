"""LLaVA-1.5: a CLIP vision tower whose projected patch tokens are written into a Llama
language model's sequence at the image-token positions (no cross-attention).

What differs from the other families: captions come through the processor's chat template with
an instruction, and only the answer is explainable; the one teacher-forced sequence holds BOS,
template, one image token per patch (the processor expands "<image>"), instruction and answer,
and position ``p - 1`` scores the id at ``p`` across all of them. A word's rows of the language
model's self-attention, at the image-token columns, play the part BLIP's cross-attention plays,
and need eager attention (SDPA returns none). The vision tower feeds the projector from
``vision_feature_layer`` (-2: the layers above it get no gradient, so the vision methods read
only the layers that reach the language model), dropping CLS under the "default" strategy. The
processor resizes the short side and centre-crops, like CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from models.cam_methods import hires_cam
from models.denormals import in_denormal_mode
from models.explainer import (
    DEFAULT_INSTRUCTION,
    INSTRUCTION_HELP,
    INSTRUCTION_LABEL,
    Caption,
    CaptionerExplainer,
    Method,
    OcclusionMethod,
    image_token_attention_relevance,
    language_attention_methods,
    patch_token_relevance,
    projector_method,
    special_token_ids,
    switch_to_eager_attention,
    vision_layer_methods,
)
from utils.patch_utils import ImageGeometry, centre_crop_geometry


class LlavaExplainer(CaptionerExplainer):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``) explained word by word.

    The language model is switched to eager attention on construction (the model is then this
    explainer's; its vision tower keeps its own implementation), and refused if that fails.
    """

    model_class = LlavaForConditionalGeneration
    processor_class = AutoProcessor
    model_types = ("llava",)
    demo_component = "blip"  # no bundled LLaVA demo: "shapes-demo" stays the BLIP one
    # The family's analogue of BLIP's default (gradient x cross-attention, mean over layers).
    default_method = "attention_contrast"
    prompt_label = INSTRUCTION_LABEL
    prompt_help = INSTRUCTION_HELP
    text_is_answer_only = True

    def __init__(self, model: LlavaForConditionalGeneration, processor, device=None, flush_denormals: bool = True):
        config = model.config
        switch_to_eager_attention(model, ["text_config"])
        self.read_image_processing(processor.image_processor)
        self.image_token_id = config.image_token_id
        tower = model.model.vision_tower
        layers = list(tower.encoder.layers)
        # hidden_states[k] is the output of layer k - 1 (0: the embeddings); the projector reads
        # vision_feature_layer, so deeper layers never reach the words.
        feature_layers = config.vision_feature_layer
        feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
        deepest = max(index % (len(layers) + 1) for index in feature_layers)
        self.vision_layers = layers[:deepest]
        self.attention_layers = [layer.self_attn for layer in model.model.language_model.layers]
        # CLIP puts CLS first (SigLIP has none); the "default" strategy drops the first token
        # before the projector, "full" writes it into the sequence as the first image token.
        self.prefix_tokens = 1 if hasattr(tower.embeddings, "class_embedding") else 0
        self.strategy = config.vision_feature_select_strategy
        if self.strategy == "default" and not self.prefix_tokens:
            raise ValueError("the 'default' feature strategy would drop a patch: this vision tower has no CLS token")
        self.special_ids = special_token_ids(processor.tokenizer, config.text_config, self.image_token_id)
        self.patch_size = config.vision_config.patch_size
        super().__init__(model, processor, device, flush_denormals)

    def read_image_processing(self, image_processor) -> None:
        """Refuse image processing whose geometry this family does not describe, and keep what
        ``image_geometry`` needs."""
        if getattr(image_processor, "do_pad", False) or not getattr(image_processor, "do_center_crop", False):
            raise ValueError("only LLaVA-1.5's resize-and-centre-crop image processing is supported")
        crop = image_processor.crop_size
        self.crop_shape = (crop["height"], crop["width"])

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        return centre_crop_geometry(image_size, self.crop_shape, self.patch_size)

    def build_methods(self) -> dict[str, Method]:
        vision_methods = vision_layer_methods(
            self.vision_layers, lambda cam: patch_token_relevance(cam, first_patch_token=self.prefix_tokens)
        )
        attention_methods = language_attention_methods(
            self.attention_layers,
            image_token_attention_relevance(
                self.image_token_id, first_patch_token=self.prefix_tokens if self.strategy == "full" else 0
            ),
        )
        projector = projector_method(
            self.model.model.multi_modal_projector,
            patch_token_relevance(hires_cam, first_patch_token=self.prefix_tokens if self.strategy == "full" else 0),
        )
        return {**attention_methods, **vision_methods, "projector": projector, "occlusion": OcclusionMethod()}

    def teacher_forced_logits(
        self, inputs: dict[str, torch.Tensor], ids: torch.Tensor, first_row: int = 0
    ) -> torch.Tensor:
        return self.model(
            input_ids=ids, **inputs, use_cache=False, logits_to_keep=ids.shape[1] - first_row
        ).logits

    def vision_tower_layers(self) -> Sequence[nn.Module]:
        # Only those that reach the words: re-randomising a layer above vision_feature_layer
        # would change nothing, and the sanity check would pass for the wrong reason.
        return self.vision_layers

    def prompt_text(self, instruction: str) -> str:
        """The chat-template text of one user turn (the image, then the instruction), ending
        where the assistant's answer begins."""
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]},
        ]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def prompt_ids(self, image: Image.Image, instruction: str) -> torch.Tensor:
        """(1, ids) of the templated prompt, "<image>" expanded to one id per image token."""
        # Typed "<image>" would ask for a second image: the one image comes from the template.
        text = self.prompt_text(instruction.replace(self.processor.image_token, " ").strip())
        return self.processor(images=[image], text=text, return_tensors="pt").input_ids.to(self.device)

    @in_denormal_mode
    @torch.no_grad()
    def caption(
        self, image: Image.Image, prompt: str = "", max_new_tokens: int = 30, num_beams: int = 1
    ) -> Caption:
        """Answer the instruction (``prompt`` when given, else DEFAULT_INSTRUCTION) about the
        image through the chat template; only the answer's words are explainable."""
        prompt_ids = self.prompt_ids(image, prompt.strip() or DEFAULT_INSTRUCTION)
        prompt_length = prompt_ids.shape[1]
        generated = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            **self.model_inputs([image]),
            max_new_tokens=self.new_token_budget(prompt_length, max_new_tokens),
            num_beams=num_beams,
            do_sample=False,
            # An image id in the answer would not match any image feature in the explanation.
            suppress_tokens=[self.image_token_id],
        )
        return self.caption_from_ids(generated[0].tolist(), prompt_length)
