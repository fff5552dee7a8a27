"""Tiny BLIP and CLIP built from small configs with a local vocabulary: no network.

Built the way transformers' BlipModelTester builds its models, then saved with
``save_pretrained`` so tests also go through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = ["a", "red", "blue", "circle", "square", "dog", "cat", "##s", "and", "picture", "of", "on", "grass"]
VOCABULARY = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
PAD_ID, CLS_ID, SEP_ID, BOS_ID = 0, 2, 3, 5
IMAGE_SIZE = 32
PATCH_SIZE = 8
VISION_LAYERS = 3
TEXT_LAYERS = 2


# Characters that Markdown, LaTeX or HTML would read as markup, for a captioner that writes them.
MARKUP_VOCABULARY = {**VOCABULARY, **{token: len(VOCABULARY) + index for index, token in enumerate("*_$[]<>`#:~")}}


def tiny_tokenizer(vocabulary: dict[str, int] = VOCABULARY) -> BertTokenizer:
    # vocab= (not vocab_file=): transformers 5 silently builds an empty vocabulary otherwise.
    return BertTokenizer(vocab=dict(vocabulary), do_lower_case=True)


def _small_tower(**overrides) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, **overrides)


def build_tiny_blip(
    seed: int = 0, max_positions: int = 64, vocabulary: dict[str, int] = VOCABULARY
) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """A 3-layer vision / 2-layer text BLIP on 32 px images (4 x 4 patches), random weights,
    whose captions hold at most ``max_positions`` ids."""
    config = BlipConfig(
        vision_config=_small_tower(num_hidden_layers=VISION_LAYERS, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        text_config=_small_tower(
            num_hidden_layers=TEXT_LAYERS,
            vocab_size=len(vocabulary),
            encoder_hidden_size=32,
            max_position_embeddings=max_positions,
            bos_token_id=BOS_ID,
            pad_token_id=PAD_ID,
            sep_token_id=SEP_ID,
            eos_token_id=SEP_ID,
        ),
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tiny_tokenizer(vocabulary),
    )
    return model.requires_grad_(False), processor


def build_tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A 3-layer vision / 2-layer text CLIP on 32 px crops (4 x 4 patches), random weights."""
    config = CLIPConfig(
        text_config=_small_tower(
            num_hidden_layers=TEXT_LAYERS,
            vocab_size=len(VOCABULARY),
            max_position_embeddings=32,
            # CLIP pools the text at the first eos_token_id when it is not the legacy 2.
            eos_token_id=SEP_ID,
            pad_token_id=PAD_ID,
            bos_token_id=CLS_ID,
        ),
        vision_config=_small_tower(num_hidden_layers=VISION_LAYERS, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tiny_tokenizer(),
    )
    return model.requires_grad_(False), processor


def build_markup_writing_blip() -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """A tiny BLIP whose captions are markup characters only ("* $ _ [ ..."), 11 of them:
    every other id, [SEP] included, is far less likely, and the random weights pick among them."""
    model, processor = build_tiny_blip(max_positions=12, vocabulary=MARKUP_VOCABULARY)
    bias = model.text_decoder.get_output_embeddings().bias.data
    bias[len(VOCABULARY):] += 100.0
    return model, processor


def save_tiny(model, processor, folder: Path) -> Path:
    """Save as a safetensors checkpoint folder that ``from_pretrained`` reads."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_with_video_section(model, processor, folder: Path, processor_name: str, video_processor_type: str) -> Path:
    """Save as the hub's folders of a chat model with video support are: the processor named by
    its full class, with a video processor section that an image-only processor must skip
    (the video processors need torchvision, which is absent here)."""
    save_tiny(model, processor, folder)
    config_path = Path(folder) / "processor_config.json"
    processor_config = json.loads(config_path.read_text())
    processor_config["processor_class"] = processor_name
    processor_config["video_processor"] = {
        **processor_config["image_processor"],
        "video_processor_type": video_processor_type,
    }
    config_path.write_text(json.dumps(processor_config, indent=2))
    return Path(folder)
