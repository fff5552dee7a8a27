"""Train the bundled shapes-world demo models: a small BLIP captioner and a small CLIP.

Both use the real transformers architectures built from small configs, a WordPiece vocabulary
of the shapes world, and scenes drawn on the fly from training seeds (>= TRAIN_SEED_START).
Everything is seeded, so the same command gives the same models on the same machine.

    nice -n 10 .venv/bin/python scripts/train_shapes_demo.py --out models/shapes_demo
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
)

from utils.shapes_world import (
    EVAL_SEEDS,
    TRAIN_SEED_START,
    VOCABULARY_WORDS,
    Scene,
    caption_distractors,
    generate_scene,
    object_size_range,
    paint_box,
    remove_object,
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
    parser.add_argument("--out", type=Path, default=Path("models/shapes_demo"))
    parser.add_argument("--eval-scenes", type=int, default=FINAL_EVAL_SCENES)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu", help="torch device for training; models are saved on CPU")
    parser.add_argument("--only", choices=("both", "blip", "clip"), default="both", help="model(s) to train")
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
    image_size = scene.image.width
    smallest, largest = object_size_range(image_size)
    for _ in range(20):
        side = int(rng.integers(smallest, largest + 1))
        x0, y0 = (int(value) for value in rng.integers(0, image_size - side + 1, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if not any(boxes_intersect(box, item.box) for item in scene.objects):
            return Scene(paint_box(scene.image, box, scene.background), scene.caption, scene.objects, scene.background)
    return scene


def boxes_intersect(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> bool:
    """True when two (x0, y0, x1, y1) boxes with exclusive ends share a pixel."""
    return box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]


def training_scene(seed: int) -> Scene:
    """Scene for one training seed, sometimes with an object removed or empty background painted."""
    scene = generate_scene(seed, IMAGE_SIZE)
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
    scenes = [generate_scene(seed, IMAGE_SIZE) for seed in seeds]
    captions = caption_scenes(model, processor, scenes)
    return float(np.mean([caption == scene.caption for caption, scene in zip(captions, scenes, strict=True)]))


@dataclass(frozen=True)
class TrainingPlan:
    """What differs between training the captioner and the dual encoder; ``train_model`` does the rest.

    Args:
        name: the model's name in logs, the report and the output folder ("blip" or "clip").
        build: tokenizer -> a freshly initialised model.
        processor: its processor (tokenizer and image processor).
        steps: optimiser steps, one batch of BATCH_SIZE scenes each.
        seed_start: first scene seed of the model's own block of training seeds.
        batch_loss: (model, tokenizer, pixel_values (B, 3, H, W), scene seeds, scenes) -> loss.
        held_out_label: what ``held_out_score`` measures, for the progress line.
        held_out_score: (model, processor, scene seeds) -> a score from 0 to 1.
    """

    name: str
    build: Callable[[BertTokenizer], nn.Module]
    processor: BlipProcessor | CLIPProcessor
    steps: int
    seed_start: int
    batch_loss: Callable[[nn.Module, BertTokenizer, torch.Tensor, range, list[Scene]], torch.Tensor]
    held_out_label: str
    held_out_score: Callable[[nn.Module, object, Sequence[int]], float]


def training_plans(
    arguments: argparse.Namespace, blip_processor: BlipProcessor, clip_processor: CLIPProcessor
) -> list[TrainingPlan]:
    """The captioner's and the dual encoder's plans, in training order."""
    return [
        TrainingPlan("blip", build_blip, blip_processor, arguments.blip_steps, BLIP_SEED_START, caption_batch_loss,
                     "held-out exact", caption_accuracy),
        TrainingPlan("clip", build_clip, clip_processor, arguments.clip_steps, CLIP_SEED_START, contrastive_batch_loss,
                     f"held-out top-1 of {CLIP_CANDIDATES}", clip_top1),
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
        scenes = [training_scene(seed) for seed in seeds]
        pixel_values = normalise_images([scene.image for scene in scenes], plan.processor.image_processor)
        loss = plan.batch_loss(model, tokenizer, pixel_values.to(arguments.device), seeds, scenes)
        learning_rate = learning_rate_at(step, plan.steps, arguments.learning_rate)
        loss = optimise_step(model, optimiser, loss, learning_rate)
        if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == plan.steps:
            score = plan.held_out_score(model, plan.processor, EVAL_SEEDS[-PROGRESS_EVAL_SCENES:])
            print(
                f"{plan.name} step {step + 1} loss {loss:.4f} elapsed {time.time() - started:.0f}s "
                f"{plan.held_out_label} {score:.2f}",
                flush=True,
            )
    return model, {"steps": plan.steps, "wall_seconds": round(time.time() - started, 1)}


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
    model: BlipForConditionalGeneration,
    tokenizer: BertTokenizer,
    pixel_values: torch.Tensor,
    seeds: range,
    scenes: list[Scene],
) -> torch.Tensor:
    """The captioner's loss on a batch: each scene's true caption, starting with the BOS id as generate() does."""
    batch = encode_captions(tokenizer, [scene.caption for scene in scenes], tokenizer.bos_token_id)
    return caption_loss(model, pixel_values, batch.to(pixel_values.device))


def contrastive_batch_loss(
    model: CLIPModel, tokenizer: BertTokenizer, pixel_values: torch.Tensor, seeds: range, scenes: list[Scene]
) -> torch.Tensor:
    """The dual encoder's loss on a batch: true captions, then CLIP_HARD_NEGATIVES distractors per scene."""
    negatives = [
        text
        for seed, scene in zip(seeds, scenes, strict=True)
        for text in caption_distractors(scene, CLIP_HARD_NEGATIVES, np.random.default_rng([seed, 2]))
    ]
    batch = encode_captions(tokenizer, [scene.caption for scene in scenes] + negatives)
    return contrastive_loss(model, pixel_values, batch.to(pixel_values.device), len(scenes))


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


def save_and_reload(model, processor, folder: Path, model_class):
    """Save model (safetensors) and processor unless None; reload both and check nothing was dropped."""
    if model is not None:
        model.to("cpu").save_pretrained(folder)
        processor.save_pretrained(folder)
    reloaded, loading_info = model_class.from_pretrained(folder, output_loading_info=True)
    problems = {key: value for key, value in loading_info.items() if value}
    if problems:
        raise RuntimeError(f"{folder}: loading reported {problems}")
    reloaded_processor = AutoProcessor.from_pretrained(folder)
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
    torch.set_num_threads(2)
    blip_processor = build_blip_processor(build_tokenizer(BLIP_MAX_TOKENS))
    clip_processor = build_clip_processor(build_tokenizer(CLIP_MAX_TOKENS))
    for processor in (blip_processor, clip_processor):
        check_round_trip(processor.tokenizer, sample_captions())
        check_fast_path(processor)
    report_path = arguments.out / "training_report.json"
    # Each model trains from its own torch seed and seed block, so one can be retrained alone.
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    for plan in training_plans(arguments, blip_processor, clip_processor):
        if arguments.only in ("both", plan.name):
            model, log = train_model(plan, arguments)
            save_and_reload(model, plan.processor, arguments.out / plan.name, type(model))
            report[plan.name] = {**log, "seed_start": plan.seed_start, "training_device": arguments.device}
    report.update(evaluate_saved(arguments.out, EVAL_SEEDS[: arguments.eval_scenes], report))
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2), flush=True)


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
