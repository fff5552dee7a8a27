"""Train the bundled shapes-world demo models: a small BLIP captioner, a small CLIP, and a small
decoder-only Qwen2-VL captioner.

All use the real transformers architectures built from small configs, a vocabulary of the
shapes world, and scenes drawn on the fly from training seeds (>= TRAIN_SEED_START). BLIP and
CLIP see 128 px squares; Qwen2-VL sees scenes of varied size and aspect ratio
(``varied_scene_size``), so its dynamic-resolution geometry is exercised. Everything is seeded,
so the same command gives the same models on the same machine.

    nice -n 10 .venv/bin/python scripts/train_shapes_demo.py --out models/shapes_demo
    nice -n 10 .venv/bin/python scripts/train_shapes_demo.py --only qwen2vl
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import nn
from torch.nn import functional
from transformers import (
    AutoProcessor,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from models.explainer import DEFAULT_INSTRUCTION
from models.qwen2vl_explainer import ImageOnlyQwen2VLProcessor
from utils.shapes_world import (
    EVAL_SEEDS,
    TRAIN_SEED_START,
    VOCABULARY_WORDS,
    Scene,
    caption_distractors,
    generate_scene,
    generate_varied_scene,
    object_size_range,
    paint_box,
    remove_object,
    varied_scene_size,
)

IMAGE_SIZE = 128
PATCH_SIZE = 16
BATCH_SIZE = 64
# [CLS] stays at id 2 so that CLIP's end id (3, [SEP]) is not the legacy value 2, which would
# switch CLIP's text pooling to "argmax of the ids".
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
BLIP_MAX_TOKENS = 32
CLIP_MAX_TOKENS = 16
# Separate seed blocks so the two models never see the same training scene sequence.
BLIP_SEED_START = TRAIN_SEED_START
CLIP_SEED_START = TRAIN_SEED_START + 50_000_000
QWEN2VL_SEED_START = TRAIN_SEED_START + 100_000_000
TORCH_SEED = 1234
CLIP_HARD_NEGATIVES = 2
# Augmentations that stay inside the world: a removed object is simply not in the scene, and a
# flat background patch over empty background changes nothing.
REMOVE_OBJECT_PROBABILITY = 0.25
PAINT_EMPTY_BOX_PROBABILITY = 0.25
PROGRESS_EVERY = 200
PROGRESS_EVAL_SCENES = 64
FINAL_EVAL_SCENES = 500
CLIP_CANDIDATES = 10


def parse_arguments() -> argparse.Namespace:
    """Command-line flags: step counts, output folder, final evaluation size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blip-steps", type=int, default=6000)
    parser.add_argument("--clip-steps", type=int, default=3000)
    parser.add_argument("--qwen2vl-steps", type=int, default=QWEN2VL_STEPS)
    parser.add_argument(
        "--qwen2vl-large-object-steps", type=int, default=QWEN2VL_LARGE_OBJECT_STEPS,
        help="first steps on the larger half of the object sizes only (a curriculum; 0: none)",
    )
    parser.add_argument("--out", type=Path, default=Path("models/shapes_demo"))
    parser.add_argument("--eval-scenes", type=int, default=FINAL_EVAL_SCENES)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu", help="torch device for training; models are saved on CPU")
    parser.add_argument(
        "--threads", type=int, default=2,
        help="torch threads; on CPU cores shared with other jobs, 1 ran a Qwen2-VL step 2-3x faster than 2",
    )  # fmt: skip
    parser.add_argument(
        "--only", choices=("both", "blip", "clip", "qwen2vl"), default="both",
        help='model(s) to train: "both" is BLIP and CLIP; "qwen2vl" the decoder-only demo',
    )
    return parser.parse_args()


def build_tokenizer(max_tokens: int) -> BertTokenizer:
    """WordPiece tokenizer over the shapes vocabulary; [DEC] is the BOS that BLIP's generate() puts first."""
    vocabulary = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *VOCABULARY_WORDS))}
    # vocab= (not vocab_file=): transformers 5 builds an empty vocabulary from vocab_file silently.
    return BertTokenizer(vocab=vocabulary, bos_token="[DEC]", do_lower_case=True, model_max_length=max_tokens)


def check_round_trip(tokenizer, captions: list[str]) -> None:
    """Raise unless every caption encodes and decodes back to itself without unknown tokens."""
    for caption in captions:
        ids = tokenizer(caption)["input_ids"]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if decoded != caption or tokenizer.unk_token_id in ids:
            raise RuntimeError(f"tokenizer round trip failed: {caption!r} -> {ids} -> {decoded!r}")


# Every tower of both models has this width; both see images through the same small ViT.
TOWER_WIDTH = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4}
VISION_TOWER = {**TOWER_WIDTH, "num_hidden_layers": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}


def build_blip(tokenizer: BertTokenizer) -> BlipForConditionalGeneration:
    """Small BLIP captioner: 4-layer ViT on 128 px / 16 px patches, 3-layer text decoder."""
    vision_config = dict(VISION_TOWER)
    text_config = {
        **TOWER_WIDTH,
        "vocab_size": len(tokenizer),
        "encoder_hidden_size": VISION_TOWER["hidden_size"],
        "num_hidden_layers": 3,
        "max_position_embeddings": BLIP_MAX_TOKENS,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    config = BlipConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=128, image_text_hidden_size=128
    )
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.copy_(sincos_positions(config.vision_config)[None])
    return model


def build_clip(tokenizer: BertTokenizer) -> CLIPModel:
    """Small CLIP: 4-layer ViT on 128 px / 16 px patches, 2-layer text tower pooled at [SEP]."""
    vision_config = dict(VISION_TOWER)
    text_config = {
        **TOWER_WIDTH,
        "vocab_size": len(tokenizer),
        "num_hidden_layers": 2,
        "max_position_embeddings": CLIP_MAX_TOKENS,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=128))
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.copy_(sincos_positions(model.config.vision_config))
    return model


def sincos_positions(vision_config) -> torch.Tensor:
    """2-D sine-cosine position table (MAE style), (1 + grid * grid, hidden); the CLS row is zero.

    Random position embeddings learn "left of" slowly, and caption order depends on it.
    """
    grid = vision_config.image_size // vision_config.patch_size
    quarter = vision_config.hidden_size // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (D/4,)
    rows, columns = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles_y = rows.flatten()[:, None] * frequencies  # (grid * grid, D/4)
    angles_x = columns.flatten()[:, None] * frequencies
    table = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    return torch.cat([torch.zeros(1, table.shape[1]), table])


def build_blip_processor(tokenizer: BertTokenizer) -> BlipProcessor:
    """BLIP processor: the PIL image processor (torchvision is absent) at 128x128, CLIP mean/std."""
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_clip_processor(tokenizer: BertTokenizer) -> CLIPProcessor:
    """CLIP processor: shortest edge 128 then a 128 centre crop (identity on shapes scenes)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def normalise_images(images: list[Image.Image], image_processor) -> torch.Tensor:
    """Fast path for 128 px scenes: rescale and normalise as the processor does; (B, 3, H, W) float32."""
    pixels = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0  # (B, H, W, 3)
    mean = np.asarray(image_processor.image_mean, dtype=np.float32)
    std = np.asarray(image_processor.image_std, dtype=np.float32)
    return torch.from_numpy((pixels - mean) / std).permute(0, 3, 1, 2).contiguous()


def check_fast_path(processor) -> None:
    """Raise unless normalise_images matches the saved processor on a few scenes."""
    images = [generate_scene(seed).image for seed in EVAL_SEEDS[:4]]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    difference = (normalise_images(images, processor.image_processor) - expected).abs().max().item()
    if difference > 1e-4:
        raise RuntimeError(f"fast image path differs from the processor by {difference}")


def paint_empty_box(scene: Scene, rng: np.random.Generator) -> Scene:
    """Scene with a random object-sized box of empty background painted flat; unchanged if none fits."""
    width, height = scene.image.size
    smallest, largest = object_size_range(min(width, height))
    for _ in range(20):
        side = int(rng.integers(smallest, largest + 1))
        x0, y0 = (int(value) for value in rng.integers(0, [width - side + 1, height - side + 1], size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if not any(boxes_intersect(box, item.box) for item in scene.objects):
            return Scene(paint_box(scene.image, box, scene.background), scene.caption, scene.objects, scene.background)
    return scene


def boxes_intersect(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> bool:
    """True when two (x0, y0, x1, y1) boxes with exclusive ends share a pixel."""
    return box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]


def training_scene(seed: int, image_size: int | tuple[int, int], size_floor: float = 0.0) -> Scene:
    """Scene for one training seed, sometimes with an object removed or empty background painted;
    `size_floor` raises its smallest object side (``object_size_range``)."""
    scene = generate_scene(seed, image_size, size_floor)
    rng = np.random.default_rng([seed, 1])
    if scene.objects and rng.random() < REMOVE_OBJECT_PROBABILITY:
        scene = remove_object(scene, int(rng.integers(len(scene.objects))))
    if rng.random() < PAINT_EMPTY_BOX_PROBABILITY:
        scene = paint_empty_box(scene, rng)
    return scene


def learning_rate_at(step: int, total_steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warmup = max(1, total_steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def caption_loss(model: BlipForConditionalGeneration, pixel_values: torch.Tensor, batch) -> torch.Tensor:
    """Teacher-forced cross-entropy: logits at t-1 score token t; padding ignored.

    Args:
        pixel_values: (B, 3, H, W) normalised images.
        batch: tokenizer output whose input_ids (B, T) start with the BOS id, as generate() starts.
    """
    input_ids = batch["input_ids"]  # (B, T)
    logits = model(
        pixel_values=pixel_values, input_ids=input_ids, attention_mask=batch["attention_mask"]
    ).logits  # (B, T, V)
    targets = input_ids[:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)  # (B, T-1)
    return functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)


def encode_captions(tokenizer: BertTokenizer, captions: list[str], bos_id: int | None = None) -> dict:
    """Padded id tensors for `captions`; with bos_id, the leading [CLS] is replaced by it."""
    batch = tokenizer(captions, padding=True, return_tensors="pt", return_token_type_ids=False)
    if bos_id is not None:
        batch["input_ids"][:, 0] = bos_id
    return batch


@torch.no_grad()
def caption_scenes(model, processor, scenes: list[Scene]) -> list[str]:
    """Greedy captions (max_new_tokens=20) through the saved processor, as the app does."""
    model.eval()
    pixel_values = processor(images=[scene.image for scene in scenes], return_tensors="pt")["pixel_values"]
    generated = model.generate(pixel_values=pixel_values.to(model.device), max_new_tokens=20)
    return [text.strip() for text in processor.batch_decode(generated, skip_special_tokens=True)]


def caption_accuracy(model, processor, seeds) -> float:
    """Fraction of held-out scenes whose greedy caption equals the true caption exactly."""
    return exact_match([generate_scene(seed, IMAGE_SIZE) for seed in seeds], caption_scenes, model, processor)


def exact_match(scenes: list[Scene], caption_function, model, processor) -> float:
    """Fraction of `scenes` whose caption by caption_function(model, processor, scenes) is exactly the true one."""
    captions = caption_function(model, processor, scenes)
    return float(np.mean([caption == scene.caption for caption, scene in zip(captions, scenes, strict=True)]))


# ------------------------------------------------------------ the decoder-only demo (Qwen2-VL)

# Qwen2-VL's special tokens (the processor and the family file find them by these names), then
# the unknown-word token of the word-level vocabulary.
QWEN2VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<unk>",
)  # fmt: skip
# Qwen2-VL-Instruct's chat template without its system prompt (a constant 8 ids per sequence that
# would only cost training time here), images and text only.
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# 16 px patches merged 2 x 2: 32 px per image token; sides of 96 to 192 px become 3 to 6 tokens.
QWEN2VL_PATCH_SIZE = 16
QWEN2VL_MERGE_SIZE = 2
QWEN2VL_MIN_PIXELS = 64 * 64
QWEN2VL_MAX_PIXELS = 224 * 224
QWEN2VL_MAX_TOKENS = 96
# The captioner names colours and counts objects within a few hundred steps, but on the whole
# range of object sizes its shape words stay near chance (loss log 3) for about 1600 steps.
# Shown only the larger half of the sizes first, it learns them within 1000 steps: this recipe
# captioned 0.73 of 64 held-out scenes exactly at step 1600 and 0.86 at 2000, against 0.41 and
# 0.61 without the curriculum (README).
QWEN2VL_STEPS = 7000
QWEN2VL_LARGE_OBJECT_STEPS = 1200
# The curriculum's scenes: the smallest object side halfway up the world's range.
LARGE_OBJECT_FLOOR = 0.5
QWEN2VL_VISION = {"depth": 4, "embed_dim": 128, "mlp_ratio": 2, "num_heads": 4}
# Head size 32: the three M-RoPE sections (time, height, width) sum to 16.
QWEN2VL_TEXT = {
    "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
}  # fmt: skip


def build_qwen2vl_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: one id per word of the captions and of the default instruction,
    lower-cased, split at white space and punctuation; decoding joins words with spaces."""
    instruction_words = [word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(DEFAULT_INSTRUCTION.lower())]
    words = dict.fromkeys((*QWEN2VL_SPECIAL_TOKENS, "user", "assistant", *instruction_words, *VOCABULARY_WORDS))
    backend = Tokenizer(models.WordLevel(vocab={word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(QWEN2VL_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens=list(QWEN2VL_SPECIAL_TOKENS[1:-1]),
        padding_side="left",  # batched generation continues every prompt from its last id
        model_max_length=QWEN2VL_MAX_TOKENS,
    )


def build_qwen2vl_processor(tokenizer: PreTrainedTokenizerFast) -> ImageOnlyQwen2VLProcessor:
    """Image-only Qwen2-VL processor (torchvision is absent): aspect kept, sides rounded to 32 px."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN2VL_PATCH_SIZE,
        merge_size=QWEN2VL_MERGE_SIZE,
        temporal_patch_size=2,
        min_pixels=QWEN2VL_MIN_PIXELS,
        max_pixels=QWEN2VL_MAX_PIXELS,
    )
    return ImageOnlyQwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2VL_CHAT_TEMPLATE
    )


def build_qwen2vl(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLForConditionalGeneration:
    """Small Qwen2-VL: 4-block vision tower (16 px patches, 2x2 merge), 3-layer language model."""
    token_id = tokenizer.convert_tokens_to_ids
    text_config = {
        **QWEN2VL_TEXT,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": QWEN2VL_MAX_TOKENS,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = {
        **QWEN2VL_VISION,
        "hidden_size": QWEN2VL_TEXT["hidden_size"],
        "patch_size": QWEN2VL_PATCH_SIZE,
        "spatial_merge_size": QWEN2VL_MERGE_SIZE,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def image_patches(count: int, weight: torch.Tensor) -> torch.Tensor:
    """`count` random flattened patches for a (D, 3, T, P, P) patch embedding whose T frames are
    copies of one another, as the image processor tiles an image: (count, 3 x T x P x P)."""
    return torch.randn(count, 3, 1, *weight.shape[3:]).expand(-1, -1, weight.shape[2], -1, -1).flatten(1)


def build_qwen2vl_for_training(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLForConditionalGeneration:
    """``build_qwen2vl`` with its patch embedding computed as one matrix product while it trains.

    The Conv3d's kernel is as large as each of its inputs, so it is exactly a linear map of the
    flattened patch; on the CPU, mkldnn's conv3d backward alone took a quarter of each step. An
    image's T frames are copies of it, so the map is one frame times the T kernels summed: half
    the product, and the same gradient for every kernel as the conv gives.
    Only this object's ``forward`` changes: the weights, and so the saved model, are the conv's.
    """
    model = build_qwen2vl(tokenizer)
    embedding = model.model.visual.patch_embed
    weight = embedding.proj.weight  # (D, 3, T, P, P)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:  # (patches, 3 x T x P x P) -> (patches, D)
        first_frame = hidden_states.to(weight.dtype).unflatten(1, weight.shape[1:])[:, :, 0]  # (patches, 3, P, P)
        return functional.linear(first_frame.flatten(1), weight.sum(dim=2).flatten(1))

    patches = image_patches(8, weight)
    with torch.no_grad():
        if not torch.allclose(forward(patches), embedding(patches), atol=1e-5):
            raise RuntimeError("the matrix-product patch embedding differs from the Conv3d")
    embedding.forward = forward
    return model


def qwen2vl_prompt(processor: ImageOnlyQwen2VLProcessor) -> str:
    """The chat-template text that the app's Qwen2-VL family captions with (the default instruction)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_INSTRUCTION}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def qwen2vl_inputs(processor: ImageOnlyQwen2VLProcessor, scenes: list[Scene], answers: list[str] | None, device: str):
    """Processor tensors for the scenes' prompts, each followed by its answer and <|im_end|> if given."""
    prompt = qwen2vl_prompt(processor)
    eos = processor.tokenizer.eos_token
    texts = [prompt + answer + eos for answer in answers] if answers else [prompt] * len(scenes)
    batch = processor(
        images=[scene.image for scene in scenes], text=texts, padding=True, return_tensors="pt",
        return_mm_token_type_ids=True,
    )  # fmt: skip
    return batch.to(device)


def qwen2vl_batch_loss(
    model: Qwen2VLForConditionalGeneration,
    processor: ImageOnlyQwen2VLProcessor,
    seeds: range,
    scenes: list[Scene],
    device: str,
) -> torch.Tensor:
    """Teacher-forced cross-entropy on the answer ids (the caption and <|im_end|>) after each prompt."""
    batch = qwen2vl_inputs(processor, scenes, [scene.caption for scene in scenes], device)
    input_ids = batch["input_ids"]  # (B, T), padded on the left
    assistant = input_ids == processor.tokenizer.convert_tokens_to_ids("assistant")
    answer = (assistant.cumsum(dim=1) - assistant.long()) > 0  # (B, T): after the "assistant" id
    targets = input_ids.masked_fill(~answer | (batch["attention_mask"] == 0), -100)
    logits = model(**batch).logits  # (B, T, V)
    return functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def qwen2vl_caption_scenes(model, processor, scenes: list[Scene]) -> list[str]:
    """Greedy answers (max_new_tokens=20) to the default instruction, as the app's family asks."""
    model.eval()
    batch = qwen2vl_inputs(processor, scenes, None, model.device)
    generated = model.generate(**batch, max_new_tokens=20, do_sample=False)
    answers = generated[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in processor.tokenizer.batch_decode(answers, skip_special_tokens=True)]


def qwen2vl_caption_accuracy(model, processor, seeds) -> float:
    """Fraction of held-out scenes of varied size whose greedy answer is exactly the true caption."""
    scenes = [generate_varied_scene(seed) for seed in seeds]
    return exact_match(scenes, qwen2vl_caption_scenes, model, processor)


@dataclass(frozen=True)
class TrainingPlan:
    """What differs between training the captioner and the dual encoder; ``train_model`` does the rest.

    Args:
        name: the model's name in logs, the report and the output folder ("blip", "clip", "qwen2vl").
        build: tokenizer -> a freshly initialised model.
        processor: its processor (tokenizer and image processor).
        steps: optimiser steps, one batch of BATCH_SIZE scenes each.
        seed_start: first scene seed of the model's own block of training seeds.
        scene_size: scene seed -> the side, or (width, height), of that scene in pixels.
        batch_loss: (model, processor, scene seeds, scenes, device) -> loss.
        held_out_label: what ``held_out_score`` measures, for the progress line.
        held_out_score: (model, processor, scene seeds) -> a score from 0 to 1.
        large_object_steps: the first steps draw only the larger half of the world's object sizes
            (``LARGE_OBJECT_FLOOR``), a curriculum; the rest draw the whole range.
    """

    name: str
    build: Callable[[PreTrainedTokenizerFast], nn.Module]
    processor: BlipProcessor | CLIPProcessor | ImageOnlyQwen2VLProcessor
    steps: int
    seed_start: int
    scene_size: Callable[[int], int | tuple[int, int]]
    batch_loss: Callable[[nn.Module, object, range, list[Scene], str], torch.Tensor]
    held_out_label: str
    held_out_score: Callable[[nn.Module, object, Sequence[int]], float]
    large_object_steps: int = 0


def square_scene(seed: int) -> int:
    """BLIP's and CLIP's scenes: IMAGE_SIZE squares whatever the seed."""
    return IMAGE_SIZE


def training_plans(
    arguments: argparse.Namespace,
    blip_processor: BlipProcessor,
    clip_processor: CLIPProcessor,
    qwen2vl_processor: ImageOnlyQwen2VLProcessor,
) -> list[TrainingPlan]:
    """The captioners' and the dual encoder's plans, in training order."""
    return [
        TrainingPlan("blip", build_blip, blip_processor, arguments.blip_steps, BLIP_SEED_START, square_scene,
                     caption_batch_loss, "held-out exact", caption_accuracy),
        TrainingPlan("clip", build_clip, clip_processor, arguments.clip_steps, CLIP_SEED_START, square_scene,
                     contrastive_batch_loss, f"held-out top-1 of {CLIP_CANDIDATES}", clip_top1),
        TrainingPlan("qwen2vl", build_qwen2vl_for_training, qwen2vl_processor, arguments.qwen2vl_steps,
                     QWEN2VL_SEED_START, varied_scene_size, qwen2vl_batch_loss, "held-out exact",
                     qwen2vl_caption_accuracy, arguments.qwen2vl_large_object_steps),
    ]  # fmt: skip


def train_model(plan: TrainingPlan, arguments: argparse.Namespace) -> tuple[nn.Module, dict]:
    """Train one model from TORCH_SEED on its block of scene seeds; returns the model and its training log."""
    torch.manual_seed(TORCH_SEED)
    tokenizer = plan.processor.tokenizer
    model = plan.build(tokenizer).to(arguments.device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=arguments.learning_rate, weight_decay=0.01)
    started = time.time()
    for step in range(plan.steps):
        model.train()
        seeds = range(plan.seed_start + step * BATCH_SIZE, plan.seed_start + (step + 1) * BATCH_SIZE)
        size_floor = LARGE_OBJECT_FLOOR if step < plan.large_object_steps else 0.0
        scenes = [training_scene(seed, plan.scene_size(seed), size_floor) for seed in seeds]
        loss = plan.batch_loss(model, plan.processor, seeds, scenes, arguments.device)
        learning_rate = learning_rate_at(step, plan.steps, arguments.learning_rate)
        loss = optimise_step(model, optimiser, loss, learning_rate)
        if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == plan.steps:
            score = plan.held_out_score(model, plan.processor, EVAL_SEEDS[-PROGRESS_EVAL_SCENES:])
            print(
                f"{plan.name} step {step + 1} loss {loss:.4f} elapsed {time.time() - started:.0f}s "
                f"{plan.held_out_label} {score:.2f}",
                flush=True,
            )
    log = {"steps": plan.steps, "wall_seconds": round(time.time() - started, 1)}
    if plan.large_object_steps:
        log |= {"large_object_steps": plan.large_object_steps, "large_object_floor": LARGE_OBJECT_FLOOR}
    return model, log


def optimise_step(model: nn.Module, optimiser, loss: torch.Tensor, learning_rate: float) -> float:
    """One AdamW step at ``learning_rate`` with gradient clipping; returns the loss."""
    for group in optimiser.param_groups:
        group["lr"] = learning_rate
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimiser.step()
    return loss.item()


def caption_batch_loss(
    model: BlipForConditionalGeneration, processor: BlipProcessor, seeds: range, scenes: list[Scene], device: str
) -> torch.Tensor:
    """The captioner's loss on a batch: each scene's true caption, starting with the BOS id as generate() does."""
    tokenizer = processor.tokenizer
    pixel_values = normalise_images([scene.image for scene in scenes], processor.image_processor).to(device)
    batch = encode_captions(tokenizer, [scene.caption for scene in scenes], tokenizer.bos_token_id)
    return caption_loss(model, pixel_values, batch.to(device))


def contrastive_batch_loss(
    model: CLIPModel, processor: CLIPProcessor, seeds: range, scenes: list[Scene], device: str
) -> torch.Tensor:
    """The dual encoder's loss on a batch: true captions, then CLIP_HARD_NEGATIVES distractors per scene."""
    pixel_values = normalise_images([scene.image for scene in scenes], processor.image_processor).to(device)
    negatives = [
        text
        for seed, scene in zip(seeds, scenes, strict=True)
        for text in caption_distractors(scene, CLIP_HARD_NEGATIVES, np.random.default_rng([seed, 2]))
    ]
    batch = encode_captions(processor.tokenizer, [scene.caption for scene in scenes] + negatives)
    return contrastive_loss(model, pixel_values, batch.to(device), len(scenes))


def contrastive_loss(model: CLIPModel, pixel_values: torch.Tensor, batch, batch_size: int) -> torch.Tensor:
    """Symmetric CLIP loss; image->text also competes with the hard-negative captions.

    Args:
        pixel_values: (B, 3, H, W) normalised images.
        batch: token tensors for B true captions followed by the hard negatives (N, T).
        batch_size: B.
    """
    image_embeds = functional.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    text_embeds = functional.normalize(model.get_text_features(**batch).pooler_output, dim=-1)  # (B + N, D)
    scale = model.logit_scale.exp()
    image_logits = scale * image_embeds @ text_embeds.T  # (B, B + N)
    text_logits = scale * text_embeds[:batch_size] @ image_embeds.T  # (B, B)
    targets = torch.arange(batch_size, device=image_embeds.device)
    return 0.5 * (functional.cross_entropy(image_logits, targets) + functional.cross_entropy(text_logits, targets))


@torch.no_grad()
def clip_top1(model: CLIPModel, processor, seeds) -> float:
    """Fraction of scenes where CLIP ranks the true caption first among it and 9 distractors."""
    model.eval()
    hits = []
    for seed in seeds:
        scene = generate_scene(seed, IMAGE_SIZE)
        candidates = [scene.caption, *caption_distractors(scene, CLIP_CANDIDATES - 1, np.random.default_rng(seed))]
        inputs = processor(text=candidates, images=scene.image, padding=True, return_tensors="pt")
        hits.append(int(model(**inputs.to(model.device)).logits_per_image.argmax().item() == 0))
    return float(np.mean(hits))


def save_and_reload(model, processor, folder: Path, model_class, processor_class=AutoProcessor):
    """Save model (safetensors) and processor unless None; reload both and check nothing was dropped."""
    if model is not None:
        model.to("cpu").save_pretrained(folder)
        processor.save_pretrained(folder)
    reloaded, loading_info = model_class.from_pretrained(folder, output_loading_info=True)
    problems = {key: value for key, value in loading_info.items() if value}
    if problems:
        raise RuntimeError(f"{folder}: loading reported {problems}")
    reloaded_processor = processor_class.from_pretrained(folder)
    check_round_trip(reloaded_processor.tokenizer, sample_captions())
    return reloaded.eval(), reloaded_processor


def sample_captions() -> list[str]:
    """True captions of the first 200 held-out scenes plus their distractors (round-trip checks)."""
    captions = []
    for seed in EVAL_SEEDS[:200]:
        scene = generate_scene(seed, IMAGE_SIZE)
        captions += [scene.caption, *caption_distractors(scene, 3, np.random.default_rng(seed))]
    return captions


def folder_megabytes(folder: Path) -> float:
    """Total size of the files in `folder` in MB."""
    return round(sum(path.stat().st_size for path in folder.iterdir()) / 1e6, 2)


def special_token_ids(tokenizer: BertTokenizer) -> dict[str, int]:
    """Name -> id of every special token, for the report."""
    return {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}


def main() -> None:
    """Build tokenizers and processors, train the chosen models, save, reload, evaluate, report."""
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    blip_processor = build_blip_processor(build_tokenizer(BLIP_MAX_TOKENS))
    clip_processor = build_clip_processor(build_tokenizer(CLIP_MAX_TOKENS))
    qwen2vl_processor = build_qwen2vl_processor(build_qwen2vl_tokenizer())
    for processor in (blip_processor, clip_processor):
        check_round_trip(processor.tokenizer, sample_captions())
        check_fast_path(processor)
    check_round_trip(qwen2vl_processor.tokenizer, sample_captions())
    report_path = arguments.out / "training_report.json"
    # Each model trains from its own torch seed and seed block, so one can be retrained alone.
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    eval_seeds = EVAL_SEEDS[: arguments.eval_scenes]
    for plan in training_plans(arguments, blip_processor, clip_processor, qwen2vl_processor):
        if arguments.only == plan.name or (arguments.only == "both" and plan.name in ("blip", "clip")):
            model, log = train_model(plan, arguments)
            processor_class = type(plan.processor) if plan.name == "qwen2vl" else AutoProcessor
            save_and_reload(model, plan.processor, arguments.out / plan.name, type(model), processor_class)
            report[plan.name] = {**log, "seed_start": plan.seed_start, "training_device": arguments.device}
    if arguments.only == "qwen2vl":
        report["qwen2vl"].update(evaluate_saved_qwen2vl(arguments.out / "qwen2vl", eval_seeds))
    else:
        report.update(evaluate_saved(arguments.out, eval_seeds, report))
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2), flush=True)


def evaluate_saved_qwen2vl(folder: Path, eval_seeds: range) -> dict:
    """Reload the saved decoder-only demo and measure it on held-out scenes of varied size."""
    model, processor = save_and_reload(None, None, folder, Qwen2VLForConditionalGeneration, ImageOnlyQwen2VLProcessor)
    sizes = np.array([varied_scene_size(seed) for seed in eval_seeds])  # (scenes, 2)
    return {
        "caption_exact_match": qwen2vl_caption_accuracy(model, processor, eval_seeds),
        "eval_seeds": [eval_seeds.start, eval_seeds.stop],
        "scene_sides": [int(sizes.min()), int(sizes.max())],
        "batch_size": BATCH_SIZE,
        "torch_seed": TORCH_SEED,
        "special_token_ids": dict(zip(QWEN2VL_SPECIAL_TOKENS, processor.tokenizer.convert_tokens_to_ids(
            list(QWEN2VL_SPECIAL_TOKENS)), strict=True)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **model_facts(model, folder),
    }


def evaluate_saved(out: Path, eval_seeds: range, report: dict) -> dict:
    """Reload both saved models from `out` and measure them on held-out seeds; report sections."""
    blip, blip_processor = save_and_reload(None, None, out / "blip", BlipForConditionalGeneration)
    clip, clip_processor = save_and_reload(None, None, out / "clip", CLIPModel)
    return {
        "caption_exact_match": caption_accuracy(blip, blip_processor, eval_seeds),
        "clip_top1_of_10": clip_top1(clip, clip_processor, eval_seeds),
        "eval_seeds": [eval_seeds.start, eval_seeds.stop],
        "blip": {**report.get("blip", {}), **model_facts(blip, out / "blip")},
        "clip": {**report.get("clip", {}), **model_facts(clip, out / "clip")},
        "batch_size": BATCH_SIZE,
        "torch_seed": TORCH_SEED,
        "special_token_ids": special_token_ids(blip_processor.tokenizer),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def model_facts(model, folder: Path) -> dict:
    """Parameter count and size on disk of a saved model."""
    return {"parameters": sum(p.numel() for p in model.parameters()), "megabytes": folder_megabytes(folder)}


if __name__ == "__main__":
    main()
