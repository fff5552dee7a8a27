"""A tiny LLaVA-OneVision built from small configs with an offline byte-level BPE tokenizer.

SigLIP vision tower (no CLS; 30 px views, 7 px patches: a 4 x 4 grid that covers 28 of the 30
px, as the real 27 x 27 grid covers 378 of 384), a Qwen2 language model, and the anyres image
processor over small pinpoints (up to 3 x 3 tiles). Saved with ``save_pretrained`` so the tests
load it through the real ``from_pretrained`` path. ``max_tiles`` sets ``anyres_max_N``: 1
shrinks every tiled grid (the bilinear path), 9 shrinks none of these sizes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from models.llava_onevision_explainer import ImageOnlyLlavaOnevisionProcessor
from tests.tiny_models import save_with_video_section
from tests.tiny_qwen2vl import IM_END_ID, PAD_ID, tiny_qwen_tokenizer

IMAGE_TOKEN = "<image>"
VIEW_SIZE = 30  # model pixels a view side
PATCH_SIZE = 7
GRID = VIEW_SIZE // PATCH_SIZE  # 4 patches a view side
VISION_LAYERS = 3
TEXT_LAYERS = 2
PINPOINTS = [[VIEW_SIZE * rows, VIEW_SIZE * columns] for rows in (1, 2, 3) for columns in (1, 2, 3)]
# llava-hf/llava-onevision-qwen2-0.5b-ov-hf's template (images and text only).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_llava_onevision(seed: int = 0, max_tiles: int = 9, max_positions: int = 512):
    """A 3-layer SigLIP / 2-layer Qwen2 LLaVA-OneVision with random weights and eager attention."""
    tokenizer = tiny_qwen_tokenizer(extra_tokens=(IMAGE_TOKEN,))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    aspect_ratio = f"anyres_max_{max_tiles}"
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=VISION_LAYERS,
            image_size=VIEW_SIZE,
            patch_size=PATCH_SIZE,
            vision_use_head=False,
        ),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            eos_token_id=IM_END_ID,
            pad_token_id=PAD_ID,
        ),
        image_token_index=image_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=aspect_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = IM_END_ID
    processor = ImageOnlyLlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": VIEW_SIZE, "width": VIEW_SIZE}, image_grid_pinpoints=PINPOINTS
        ),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=GRID * GRID,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect_ratio,
    )
    return model.requires_grad_(False), processor


def save_tiny_llava_onevision(model, processor, folder: Path) -> Path:
    """Save as llava-hf's OneVision folders are (``LlavaOnevisionProcessor``, a video section)."""
    return save_with_video_section(model, processor, folder, "LlavaOnevisionProcessor", "LlavaOnevisionVideoProcessor")
