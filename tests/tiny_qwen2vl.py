"""A tiny Qwen2-VL (or Qwen2.5-VL) built from a small config, with a byte-level BPE tokenizer trained offline.

Built as transformers' Qwen2VL model tester builds its models (tiny vision tower and language
model, ``mrope_section`` summing to half the head size), then saved with ``save_pretrained`` so
the tests load it through the real ``from_pretrained`` path, as the app does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from models.qwen2vl_explainer import (
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen2VLProcessor,
    ImageOnlyQwen3VLProcessor,
)
from tests.tiny_models import save_with_video_section

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PAD_ID, IM_START_ID, IM_END_ID, VISION_START_ID, VISION_END_ID, IMAGE_ID, VIDEO_ID = range(len(SPECIAL_TOKENS))
CORPUS = [
    "a red circle and a blue square.",
    "a dog on grass.",
    "two red dogs and blue squares.",
    "Describe this image in one sentence.",
    "What colour is the dog?",
    "system user assistant You are a helpful assistant.",
] * 20
# Qwen2-VL-Instruct's chat template (images and text only).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH_SIZE = 4
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 8 model pixels per merged token side (28 for the real checkpoints)
MIN_PIXELS = FACTOR * FACTOR * 4
MAX_PIXELS = FACTOR * FACTOR * 40
VISION_DEPTH = 3
TEXT_LAYERS = 2


def tiny_qwen_tokenizer(extra_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE (pieces carry their leading space as "Ġ"), Qwen's special tokens first,
    then ``extra_tokens`` (special too)."""
    special_tokens = SPECIAL_TOKENS + list(extra_tokens)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    built = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=special_tokens[1:],
    )
    assert built.convert_tokens_to_ids(special_tokens) == list(range(len(special_tokens)))
    return built


def _vision_config(model_type: str) -> dict:
    shared = dict(
        depth=VISION_DEPTH, num_heads=4, patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE, temporal_patch_size=2
    )
    if model_type == "qwen2_vl":
        return dict(shared, embed_dim=32, hidden_size=32, mlp_ratio=2)
    if model_type == "qwen3_vl":
        # Learnt position embeddings on a 4 x 4 grid, interpolated; block 2's output also goes
        # straight to the first language-model layer ("deepstack").
        return dict(
            shared,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=32,
            num_position_embeddings=16,
            deepstack_visual_indexes=[1],
        )
    # Qwen2.5-VL: windows of 2 x 2 merged tokens (16 model pixels) in every block but the second.
    return dict(
        shared, hidden_size=32, intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1]
    )


def _text_config(model_type: str, vocabulary_size: int, max_positions: int) -> dict:
    config = dict(
        vocab_size=vocabulary_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        # head size 8: the three M-RoPE sections (time, height, width) sum to 4.
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        pad_token_id=PAD_ID,
    )
    if model_type == "qwen3_vl":  # no BOS / EOS in its text config (the generation config has EOS)
        return dict(config, head_dim=8, rope_parameters={**config["rope_parameters"], "mrope_interleaved": True})
    return dict(config, bos_token_id=None, eos_token_id=IM_END_ID)


MODEL_CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, ImageOnlyQwen2VLProcessor, "Qwen2VLProcessor"),
    "qwen2_5_vl": (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        ImageOnlyQwen2_5_VLProcessor,
        "Qwen2_5_VLProcessor",
    ),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, ImageOnlyQwen3VLProcessor, "Qwen3VLProcessor"),
}


def build_tiny_qwen2vl(seed: int = 0, model_type: str = "qwen2_vl", max_positions: int = 256):
    """A 3-block vision tower (patch 4, merge 2) and a 2-layer language model, random weights;
    ``model_type`` "qwen2_vl", "qwen2_5_vl" or "qwen3_vl"; sequences of at most ``max_positions``
    ids. Returns (model, image-only processor)."""
    config_class, model_class, processor_class, _ = MODEL_CLASSES[model_type]
    tokenizer = tiny_qwen_tokenizer()
    config = config_class(
        vision_config=_vision_config(model_type),
        text_config=_text_config(model_type, len(tokenizer), max_positions),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = PAD_ID
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return model.requires_grad_(False), processor


def save_tiny_qwen2vl(model, processor, folder: Path) -> Path:
    """Save as the hub's Qwen2-VL folders are: the processor named by its class (``Qwen2VLProcessor``),
    with a video processor section (which the image-only processor must skip, torchvision being absent)."""
    processor_name = MODEL_CLASSES[model.config.model_type][3]
    return save_with_video_section(model, processor, folder, processor_name, "Qwen2VLVideoProcessor")
