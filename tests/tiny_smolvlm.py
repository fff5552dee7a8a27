"""A tiny SmolVLM (Idefics3 architecture) built from a small config, with a byte-level BPE
tokenizer trained offline on a few sentences (models/smolvlm_offline.py): no network.

Sizes: 16 px tiles of 4 x 4 patches (4 px each), pixel shuffle by 2, so each tile gives
4 image tokens; the long side of an image is resized to 32 px, so a non-square image is cut
into 2 x 1, 1 x 2 or 2 x 2 tiles plus a global view.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from models.smolvlm_explainer import END_OF_UTTERANCE, SmolVLMImageTextProcessor
from models.smolvlm_offline import BOS, PAD, offline_smolvlm_tokenizer

TILE_SIZE = 16  # the vision tower's image size (the processor's max_image_size)
LONGEST_EDGE = 32  # the processor resizes every image's long side to this
PATCH_SIZE = 4
SCALE_FACTOR = 2
VISION_LAYERS = 3
TEXT_LAYERS = 2

# model_type -> (config class, model class): SmolVLM's architecture under both its names
# (HuggingFaceTB/SmolVLM-256M-Instruct is an "idefics3" checkpoint, SmolVLM2 a "smolvlm" one).
ARCHITECTURES = {
    "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration),
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
}


def build_tiny_smolvlm(
    seed: int = 0, max_positions: int = 512, model_type: str = "smolvlm"
) -> tuple[SmolVLMForConditionalGeneration | Idefics3ForConditionalGeneration, SmolVLMImageTextProcessor]:
    """A 3-layer vision / 2-layer Llama SmolVLM (or Idefics3) with random weights, eager attention."""
    config_class, model_class = ARCHITECTURES[model_type]
    tokenizer = offline_smolvlm_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=ids(BOS),
        eos_token_id=ids(END_OF_UTTERANCE),
        pad_token_id=ids(PAD),
    )
    config = config_class(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=VISION_LAYERS,
            num_attention_heads=4,
            image_size=TILE_SIZE,
            patch_size=PATCH_SIZE,
        ),
        text_config=text_config.to_dict(),
        scale_factor=SCALE_FACTOR,
        image_token_id=ids("<image>"),
        pad_token_id=ids(PAD),
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.eos_token_id = ids(END_OF_UTTERANCE)
    model.generation_config.pad_token_id = ids(PAD)
    model.generation_config.bos_token_id = ids(BOS)
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE_SIZE}
    )
    processor = SmolVLMImageTextProcessor(image_processor, tokenizer)
    return model.requires_grad_(False), processor


def save_tiny_smolvlm(folder: Path, **kwargs) -> Path:
    model, processor = build_tiny_smolvlm(**kwargs)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
