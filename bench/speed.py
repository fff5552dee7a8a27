"""Speed and memory of word-by-word explanations on a family's real-size architecture (random weights).

Random weights cost exactly what the real checkpoint costs (same config, same shapes), and
need no download. ``--family blip`` builds BLIP base and times Grad-CAM (its gradient crosses
the whole vision tower); ``--family smolvlm`` builds SmolVLM-256M-Instruct and times the
family's default method (gradient x attention over the language model's layers);
``--family florence2`` (Florence-2-base) and ``--family blip2`` (blip2-opt-2.7b) time HiResCAM,
whose gradient crosses their whole vision towers. Every number
is the median of ``--repeats`` runs, measured side by side in this one process so that ratios
are fair on a busy machine. The ``_unflushed`` measures run the same work without flushing
denormal floats, which on some CPUs is ten times slower.

    python bench/speed.py --json bench/results/speed.json
    python bench/speed.py --family smolvlm --json bench/results/speed_smolvlm.json
    python bench/speed.py --family florence2 --json bench/results/speed_florence2.json
    python bench/speed.py --family blip2 --json bench/results/speed_blip2.json  # about 16 GB of memory
    python bench/speed.py --family llava_onevision --goals-only --repeats 1
    python bench/speed.py --family qwen2_vl --goals-only --repeats 1

``--goals-only`` leaves out the reference design's one pass per layer and the unflushed
repeats: on the 0.5 B and 2 B architectures they alone would take most of an hour on 2 cores.
The chat families' tokenizers are the offline ones the tests build (their ids lie within the
real vocabularies, which set the embedding and output sizes).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    BartConfig,
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipProcessor,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlamaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from models.denormals import set_flush_denormal_everywhere
from models.explainer import DEFAULT_INSTRUCTION, Caption, CaptionerExplainer
from models.families import explainer_for_model
from models.florence2_explainer import CAPTION_TASKS
from models.hooks import capture_outputs
from models.llava_onevision_explainer import ImageOnlyLlavaOnevisionProcessor
from models.qwen2vl_explainer import ImageOnlyQwen2VLProcessor
from models.smolvlm_explainer import END_OF_UTTERANCE, IMAGE_TOKEN, SmolVLMImageTextProcessor
from models.smolvlm_offline import BOS, CORPUS, PAD, offline_smolvlm_tokenizer
from tests import tiny_llava_onevision, tiny_qwen2vl
from utils.image_utils import overlay_heatmap
from utils.video_utils import encode_mp4, layer_frames


def build_blip_base_architecture(flush_denormals: bool = True) -> CaptionerExplainer:
    """BLIP base as configured by ``BlipConfig()`` defaults, random weights, synthetic vocabulary."""
    config = BlipConfig()
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval().requires_grad_(False)
    text_config = config.text_config
    vocabulary = {f"word{index}": index for index in range(text_config.vocab_size)}
    for name, index in [("[PAD]", text_config.pad_token_id), ("[SEP]", text_config.sep_token_id),
                        ("[DEC]", text_config.bos_token_id), ("[UNK]", 100), ("[CLS]", 101)]:
        vocabulary.pop(next(word for word, value in vocabulary.items() if value == index))
        vocabulary[name] = index
    size = config.vision_config.image_size
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=BertTokenizer(vocab=vocabulary),
    )
    return explainer_for_model(model, processor, torch.device("cpu"), flush_denormals)


# SmolVLM-256M-Instruct's long side before tiling. The checkpoint's processor resizes to 2048 px
# (4 x 4 tiles of 512 px plus the global view, 17 x 1024 patches through the vision tower);
# 512 px gives the global view alone, one 512 px tile: 1024 patches, 64 image tokens, so that one
# forward pass and gradient takes seconds on a laptop CPU. Tiles are independent in the vision
# tower, so its cost grows linearly with their number.
SMOLVLM_LONGEST_EDGE = 512


def build_smolvlm_256m_architecture(
    flush_denormals: bool = True, longest_edge: int = SMOLVLM_LONGEST_EDGE
) -> CaptionerExplainer:
    """SmolVLM-256M-Instruct's architecture ("idefics3", as its config.json names it), random
    weights, the offline byte-level tokenizer of models/smolvlm_offline.py (its ids all lie
    within the real vocabulary, which sets the size of the embeddings and the output layer).

    Sources of the numbers: the model card (HuggingFaceTB/SmolVLM-256M-Instruct) names its two
    parts, google/siglip-base-patch16-512 and HuggingFaceTB/SmolLM2-135M; the blog post "SmolVLM
    Grows Smaller" gives 4096 pixels per image token (a 512 px tile, 32 x 32 patches of 16 px,
    folded 4 x 4 by the pixel shuffle into 64 tokens: scale_factor 4). transformers'
    Idefics3Config and SmolVLMConfig defaults are those of larger checkpoints (SigLIP so400m,
    patch 14 / 32, scale_factor 2), so every size is written out here. The total (printed as
    parameters_m) is 256.5 M with untied input and output embeddings (Idefics3Config's
    tie_word_embeddings=False); tied, it would be 228 M, so the 256 M of the name says untied.
    """
    tokenizer = offline_smolvlm_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text_config = LlamaConfig(  # SmolLM2-135M
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,  # grouped-query attention: 3 query heads share each key/value head
        vocab_size=49280,  # SmolLM2's 49152 plus SmolVLM's image and layout tokens (<row_i_col_j>, ...)
        max_position_embeddings=8192,  # SmolVLM's longer context (SmolLM2 itself: 2048); no cost here
        tie_word_embeddings=False,
        bos_token_id=ids(BOS),
        eos_token_id=ids(END_OF_UTTERANCE),
        pad_token_id=ids(PAD),
    )
    config = Idefics3Config(
        vision_config=dict(  # SigLIP base, patch 16, 512 px (siglip-base-patch16-512's vision tower)
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            image_size=512,
        ),
        text_config=text_config.to_dict(),
        scale_factor=4,  # 4 x 4 patches per image token: 4096 pixels per token (blog post)
        image_token_id=ids(IMAGE_TOKEN),
        tie_word_embeddings=False,
        pad_token_id=ids(PAD),
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval().requires_grad_(False)
    model.generation_config.eos_token_id = ids(END_OF_UTTERANCE)
    model.generation_config.pad_token_id = ids(PAD)
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": config.vision_config.image_size}
    )
    processor = SmolVLMImageTextProcessor(image_processor, tokenizer)
    return explainer_for_model(model, processor, torch.device("cpu"), flush_denormals)


# BART's and OPT's special tokens (byte-level BPE vocabularies from RoBERTa / GPT-2).
BART_SPECIAL_TOKENS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
IMAGE_TOKEN_TEXT = "<image>"


def word_level_tokenizer(size: int, bos: str, image_token_id: int | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer of ``size`` synthetic words ("w4", "w5", ...), one id each, with BART's special
    tokens at their ids: the real vocabulary's size, with no download. ``image_token_id``: where
    an "<image>" token stands (Florence-2); None leaves it to the processor (BLIP-2's adds it
    after the vocabulary). ``bos``: the token that starts a sequence ("</s>" for OPT, which the
    tokenizer then writes first)."""
    vocabulary = {f"w{index}": index for index in range(len(BART_SPECIAL_TOKENS), size)} | BART_SPECIAL_TOKENS
    extra = {}
    if image_token_id is not None:
        vocabulary[IMAGE_TOKEN_TEXT] = image_token_id
        extra["extra_special_tokens"] = {"image_token": IMAGE_TOKEN_TEXT}
    word_level = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if bos == "</s>":
        word_level.post_processor = processors.TemplateProcessing(
            single="</s> $A", special_tokens=[("</s>", BART_SPECIAL_TOKENS["</s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token=bos, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **extra
    )


def build_florence2_base_architecture(flush_denormals: bool = True) -> CaptionerExplainer:
    """Florence-2-base's architecture (florence-community/Florence-2-base), random weights, a
    synthetic word-level vocabulary of the real size.

    Sources of the numbers: Florence2VisionConfig's defaults are the base DaViT (depths 1, 1, 9,
    1; widths 128 to 1024; window 12) but its projection_dim (1024) is the large model's: base
    projects to 768, BART base's width (6 encoder and 6 decoder layers, 12 heads, 3072-wide
    feed-forward, 1024 positions). The vocabulary is BART's 51289 pieces (with Florence-2's
    location tokens) plus the <image> token, id 51289 (Florence2Config's default). The
    processor squashes images to 768 x 768: a 24 x 24 grid of 32 px tokens plus their mean,
    577 image tokens (the checkpoint's preprocessor_config.json).
    """
    image_token_id = 51289
    tokenizer = word_level_tokenizer(image_token_id, bos="<s>", image_token_id=image_token_id)
    config = Florence2Config(
        vision_config=Florence2VisionConfig(projection_dim=768),
        text_config=BartConfig(
            vocab_size=len(tokenizer),
            d_model=768,
            encoder_layers=6,
            decoder_layers=6,
            encoder_attention_heads=12,
            decoder_attention_heads=12,
            encoder_ffn_dim=3072,
            decoder_ffn_dim=3072,
            max_position_embeddings=1024,
            bos_token_id=0,
            pad_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        image_token_id=image_token_id,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config).eval().requires_grad_(False)
    image_processor = CLIPImageProcessorPil(
        size={"height": 768, "width": 768}, do_center_crop=False, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], image_seq_length=577,
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    return explainer_for_model(model, processor, torch.device("cpu"), flush_denormals)


def florence2_caption(explainer: CaptionerExplainer, image: Image.Image, words: int) -> Caption:
    """The encoder's text for <CAPTION>, then ``words`` synthetic words (one id each) between the
    decoder's </s> <s> and </s>, as ``caption`` returns one."""
    text_ids = explainer.prompt_inputs(image, CAPTION_TASKS[0])["input_ids"][0, explainer.image_token_count :]
    bos, eos = BART_SPECIAL_TOKENS["<s>"], BART_SPECIAL_TOKENS["</s>"]
    decoder_ids = [eos, bos, *range(1000, 1000 + words), eos]
    return explainer.caption_from_ids([*text_ids.tolist(), *decoder_ids], len(text_ids) + 1)


def build_blip2_opt_27b_architecture(flush_denormals: bool = True) -> CaptionerExplainer:
    """Salesforce/blip2-opt-2.7b's architecture, random weights, a synthetic word-level vocabulary
    of the real size: 3.74 B parameters (OPT's output layer is its input embedding), about 15 GB
    in float32.

    Sources of the numbers: Blip2VisionConfig's and Blip2QFormerConfig's defaults are the
    checkpoint's (EVA ViT-g/14: 39 layers, width 1408, 224 px; a 12-layer Q-Former, width 768,
    cross-attention on every second layer; 32 queries); the language model is OPT-2.7b (32
    layers, width 2560, 32 heads, 10240-wide feed-forward, 2048 positions), whose vocabulary of
    50265 pieces gets "<image>" (id 50265) from the processor; the embeddings hold 50272 rows.
    """
    image_processor = BlipImageProcessorPil(
        size={"height": 224, "width": 224},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = Blip2Processor(image_processor, word_level_tokenizer(50265, bos="</s>"), num_query_tokens=32)
    text_config = OPTConfig(
        hidden_size=2560,
        ffn_dim=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        word_embed_proj_dim=2560,
        vocab_size=50272,
        max_position_embeddings=2048,
        bos_token_id=BART_SPECIAL_TOKENS["</s>"],
        eos_token_id=BART_SPECIAL_TOKENS["</s>"],
        pad_token_id=BART_SPECIAL_TOKENS["<pad>"],
    )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(initializer_range=0.02),  # its default, 1e-10, zeroes the tower
        qformer_config=Blip2QFormerConfig(),
        text_config=text_config,
        num_query_tokens=32,
        image_token_index=processor.tokenizer.convert_tokens_to_ids(processor.image_token.content),
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval().requires_grad_(False)
    return explainer_for_model(model, processor, torch.device("cpu"), flush_denormals)


def blip2_caption(explainer: CaptionerExplainer, image: Image.Image, words: int) -> Caption:
    """The query ids and </s>, then ``words`` synthetic words (one id each) and </s>, as
    ``caption`` returns one without a prompt."""
    prompt = explainer.processor(images=[image], text="", return_tensors="pt").input_ids[0].tolist()
    return explainer.caption_from_ids([*prompt, *range(1000, 1000 + words), BART_SPECIAL_TOKENS["</s>"]], len(prompt))


QWEN_VOCABULARY = 151936  # Qwen2's embedding rows (its tokenizer's 151643 ids plus room for added tokens)


def build_llava_onevision_05b_architecture(flush_denormals: bool = True) -> CaptionerExplainer:
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf's architecture, random weights: SigLIP so400m
    (patch 14, 384 px: LlavaOnevisionConfig's own vision defaults), a two-layer projector and
    Qwen2-0.5B (sizes from Qwen/Qwen2-0.5B's config: 24 layers of 896, 14 query heads sharing 2
    key/value heads, embeddings tied). The model card's "0.9B" is what ``parameters_m`` prints.
    The processor is LlavaOnevisionImageProcessor's defaults (384 px views, pinpoints up to
    2304 px, anyres_max_9), as in the checkpoint. Attention as from_pretrained sets it (SDPA),
    until the explainer switches the language model to eager."""
    tokenizer = tiny_qwen2vl.tiny_qwen_tokenizer(extra_tokens=(tiny_llava_onevision.IMAGE_TOKEN,))
    image_token_id = tokenizer.convert_tokens_to_ids(tiny_llava_onevision.IMAGE_TOKEN)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
            patch_size=14, image_size=384, vision_use_head=False,
        ),
        text_config=Qwen2Config(
            vocab_size=QWEN_VOCABULARY, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
            eos_token_id=tiny_qwen2vl.IM_END_ID, pad_token_id=tiny_qwen2vl.PAD_ID,
        ),
        image_token_index=image_token_id,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval().requires_grad_(False)
    model.generation_config.eos_token_id = tiny_qwen2vl.IM_END_ID
    processor = ImageOnlyLlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(image_grid_pinpoints=config.image_grid_pinpoints),
        tokenizer=tokenizer,
        chat_template=tiny_llava_onevision.CHAT_TEMPLATE,
        num_image_tokens=(384 // 14) ** 2,
        vision_feature_select_strategy="full",
    )
    return explainer_for_model(model, processor, torch.device("cpu"), flush_denormals)


def build_qwen2_vl_2b_architecture(flush_denormals: bool = True) -> CaptionerExplainer:
    """Qwen/Qwen2-VL-2B-Instruct's architecture, random weights: the 675 M ViT (32 blocks of 1280,
    patch 14, 2 x 2 merge into 1536-wide tokens) and Qwen2-1.5B (28 layers of 1536, 12 query
    heads sharing 2 key/value heads, M-RoPE sections 16/24/24, embeddings tied), sizes from the
    checkpoint's config.json; its processor's pixel bounds (3136 to 12845056). Attention as
    from_pretrained sets it (SDPA), until the explainer switches the language model to eager."""
    tokenizer = tiny_qwen2vl.tiny_qwen_tokenizer()
    config = Qwen2VLConfig(
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(
            vocab_size=QWEN_VOCABULARY, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=tiny_qwen2vl.IM_END_ID,
            pad_token_id=tiny_qwen2vl.PAD_ID,
        ),
        image_token_id=tiny_qwen2vl.IMAGE_ID, video_token_id=tiny_qwen2vl.VIDEO_ID,
        vision_start_token_id=tiny_qwen2vl.VISION_START_ID, vision_end_token_id=tiny_qwen2vl.VISION_END_ID,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval().requires_grad_(False)
    model.generation_config.eos_token_id = tiny_qwen2vl.IM_END_ID
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12845056}),
        tokenizer=tokenizer,
        chat_template=tiny_qwen2vl.CHAT_TEMPLATE,
    )
    return explainer_for_model(model, processor, torch.device("cpu"), flush_denormals)


def blip_caption(explainer: CaptionerExplainer, image: Image.Image, words: int) -> Caption:
    """``words`` synthetic words (one vocabulary id each) between BLIP's [DEC] and [SEP]."""
    text_config = explainer.model.config.text_config
    return explainer.caption_from_ids([text_config.bos_token_id, *range(1000, 1000 + words), text_config.sep_token_id])


def smolvlm_caption(explainer: CaptionerExplainer, image: Image.Image, words: int) -> Caption:
    """An answer of ``words`` words from the tokenizer's corpus after the chat prompt (instruction
    and image tokens), ended by <end_of_utterance>, as ``caption`` returns one."""
    vocabulary = " ".join(CORPUS[1:3]).replace("Assistant:", "").replace(".", "").split()
    answer = " ".join(vocabulary[index % len(vocabulary)] for index in range(words))
    tokenizer = explainer.processor.tokenizer
    prompt = explainer.prompt_ids(image, DEFAULT_INSTRUCTION)
    answer_ids = tokenizer(" " + answer, add_special_tokens=False).input_ids
    end = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    return explainer.caption_from_ids([*prompt, *answer_ids, end], len(prompt))


def chat_caption(explainer: CaptionerExplainer, image: Image.Image, words: int) -> Caption:
    """An answer of ``words`` words from the offline tokenizer's corpus after the chat prompt,
    ended by the tokenizer's EOS, through the processor (image tokens expanded), as ``caption``
    returns one (LLaVA-OneVision, Qwen2-VL)."""
    vocabulary = " ".join(tiny_qwen2vl.CORPUS[:3]).replace(".", "").split()
    answer = " ".join(vocabulary[index % len(vocabulary)] for index in range(words))
    prompt_text = explainer.prompt_text(DEFAULT_INSTRUCTION)
    tokenizer = explainer.processor.tokenizer
    prompt = explainer.processor(images=[image], text=[prompt_text])["input_ids"][0]
    ids = explainer.processor(images=[image], text=[prompt_text + answer + tokenizer.eos_token])["input_ids"][0]
    return explainer.caption_from_ids(list(ids), len(prompt))


# family -> (builder, what it builds, the method every measure times, caption of n words)
FAMILIES = {
    "blip": (build_blip_base_architecture, "BlipConfig() defaults, random weights", "gradcam", blip_caption),
    "smolvlm": (
        build_smolvlm_256m_architecture,
        f"SmolVLM-256M-Instruct architecture (Idefics3), random weights, long side {SMOLVLM_LONGEST_EDGE} px",
        "attention",
        smolvlm_caption,
    ),
    # HiResCAM: its gradient crosses the whole DaViT tower, as BLIP's Grad-CAM crosses its ViT.
    "florence2": (
        build_florence2_base_architecture,
        "Florence-2-base architecture, random weights, 768 px",
        "hirescam",
        florence2_caption,
    ),
    # Not measured on the 2-core, 24 GiB development machine: it needs about 16 GB in float32.
    "blip2": (
        build_blip2_opt_27b_architecture,
        "blip2-opt-2.7b architecture, random weights, 224 px",
        "hirescam",
        blip2_caption,
    ),
    "llava_onevision": (
        build_llava_onevision_05b_architecture,
        "LLaVA-OneVision-0.5B architecture (SigLIP so400m, Qwen2-0.5B), random weights",
        "attention",
        chat_caption,
    ),
    "qwen2_vl": (
        build_qwen2_vl_2b_architecture,
        "Qwen2-VL-2B-Instruct architecture (675 M ViT, Qwen2-1.5B), random weights",
        "attention",
        chat_caption,
    ),
}


def interleaved_medians(functions: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in interleaved rounds (A, B, C, A, B, C, ...), so a
    slow spell on a shared machine hits every measure alike and the ratios stay fair."""
    timings: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def forward_and_gradient(
    explainer: CaptionerExplainer, image: Image.Image, token_ids: list[int], position: int, method: str, layers: slice
) -> None:
    """One forward pass and one gradient of one token with respect to the given layers of a method."""
    chosen = explainer.methods[method]
    set_flush_denormal_everywhere(explainer.flush_denormals)  # as the explainer's own methods do
    inputs = {
        name: value.requires_grad_(True) if value.is_floating_point() else value
        for name, value in explainer.model_inputs([image]).items()
    }
    with torch.enable_grad(), capture_outputs(chosen.modules[layers], chosen.output_index) as captured:
        logits = explainer.teacher_forced_logits(inputs, torch.tensor([token_ids]))
        score = logits[0, position - 1].log_softmax(-1)[token_ids[position]]
        torch.autograd.grad(score, captured)


def naive_all_layers(
    explainer: CaptionerExplainer, image: Image.Image, token_ids: list[int], position: int, method: str
) -> None:
    """The reference design's way: a separate forward and backward pass for every layer."""
    for layer in range(len(explainer.methods[method].modules)):
        forward_and_gradient(explainer, image, token_ids, position, method, slice(layer, layer + 1))


def first_heatmap(explainer: CaptionerExplainer, image: Image.Image, caption, word: int, method: str) -> np.ndarray:
    """What the page does between showing the caption and showing the first heatmap: the chosen
    word's maps alone (the other words are filled in after), drawn over the displayed image.

    BLIP's measures time Grad-CAM: its gradient crosses the whole vision tower, so it costs at
    least what the default method (gradient x cross-attention, decoder only) costs.
    """
    (maps,) = explainer.explain(image, caption, [word], method=method)
    heat = explainer.image_geometry(image.size).cams_to_image(maps.cam_patches)
    return overlay_heatmap(image, heat[explainer.default_layer(maps.method)])


def encode_layer_video(
    explainer: CaptionerExplainer, image: Image.Image, cam_patches: np.ndarray, method: str
) -> bytes:
    """The app's video: every layer's overlay held, cross-faded, encoded as H.264."""
    heat_maps = explainer.image_geometry(image.size).cams_to_image(cam_patches)
    labels = explainer.layer_names(method)
    frames = layer_frames(image, heat_maps, labels, "word", alpha=0.5, colormap="jet", hold_frames=12, fade_frames=6)
    return encode_mp4(frames, fps=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=tuple(FAMILIES), default="blip", help="which architecture to build")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--words", type=int, default=8, help="caption length in words")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument(
        "--goals-only", action="store_true", help="leave out the one-pass-per-layer and unflushed measures"
    )
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    build, model_description, method, make_caption = FAMILIES[arguments.family]
    print(f"family {arguments.family}: {model_description}; method {method!r}", flush=True)
    explainer = build()
    unflushed = explainer_for_model(explainer.model, explainer.processor, explainer.device, flush_denormals=False)
    width, height = arguments.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    caption = make_caption(explainer, image, arguments.words)
    token_ids = list(caption.token_ids)
    word = len(caption.words) // 2
    position = caption.words[word].start
    repeats = arguments.repeats

    (maps,) = explainer.explain(image, caption, [word], method=method)  # warm-up: allocator, hooks
    first_layer = slice(0, 1)  # the method's shallowest layer: the gradient crosses all of its layers
    measures = {
        # The floor: one forward pass, one gradient reaching the method's shallowest layer.
        "fwd_bwd_s": lambda: forward_and_gradient(explainer, image, token_ids, position, method, first_layer),
        "all_layers_one_word_s": lambda: explainer.explain(image, caption, [word], method=method),
        "first_heatmap_s": lambda: first_heatmap(explainer, image, caption, word, method),
        "all_words_all_layers_s": lambda: explainer.explain(image, caption, method=method),
        "caption_s": lambda: explainer.caption(image, max_new_tokens=20),
        "video_encode_s": lambda: encode_layer_video(explainer, image, maps.cam_patches, method),
    }
    if not arguments.goals_only:
        measures |= {
            "fwd_bwd_unflushed_s": lambda: forward_and_gradient(
                unflushed, image, token_ids, position, method, first_layer
            ),
            "all_layers_one_word_unflushed_s": lambda: unflushed.explain(image, caption, [word], method=method),
            "naive_all_layers_one_word_s": lambda: naive_all_layers(explainer, image, token_ids, position, method),
        }
    results = interleaved_medians(measures, arguments.repeats)
    results["n_words"] = len(caption.words)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ratios = {
        "all_layers_one_word / fwd_bwd": ("all_layers_one_word_s", "fwd_bwd_s", 1),
        "naive_all_layers_one_word / fwd_bwd": ("naive_all_layers_one_word_s", "fwd_bwd_s", 1),
        "all_words_all_layers / (n_words x fwd_bwd)": ("all_words_all_layers_s", "fwd_bwd_s", results["n_words"]),
        "first_heatmap / all_layers_one_word": ("first_heatmap_s", "all_layers_one_word_s", 1),
        "fwd_bwd_unflushed / fwd_bwd": ("fwd_bwd_unflushed_s", "fwd_bwd_s", 1),
        "all_layers_one_word_unflushed / all_layers_one_word": (
            "all_layers_one_word_unflushed_s",
            "all_layers_one_word_s",
            1,
        ),
    }
    results["ratios"] = {
        name: results[numerator] / (count * results[denominator])
        for name, (numerator, denominator, count) in ratios.items()
        if numerator in results
    }
    geometry = explainer.image_geometry(image.size)
    results["setup"] = {
        "family": arguments.family,
        "model": model_description,
        "method": method,
        "image_size": image.size,
        "parameters_m": sum(parameter.numel() for parameter in explainer.model.parameters()) / 1e6,
        "views": len(geometry.views),  # views the maps cover (tiles + global view for SmolVLM, OneVision)
        "image_tokens": token_ids.count(getattr(explainer, "image_token_id", -1)),
        "grid": geometry.views[0].grid_shape,
        "patch_size": explainer.patch_size,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "denormals_flushed": explainer.flush_denormals,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor()}",
    }

    width = max(len(key) for key in results)
    for key, value in results.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                print(f"{key + ': ' + sub_key:<{width + 40}} {sub_value}")
        else:
            print(f"{key:<{width + 40}} {value:.3f}" if isinstance(value, float) else f"{key:<{width + 40}} {value}")
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
