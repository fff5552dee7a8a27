"""A tiny Florence-2 built from small configs with a tokenizer trained offline: no network.

A three-stage DaViT vision tower (strides 4, 2, 2: 16 x 16, 8 x 8 and 4 x 4 grids on a 64 px
input), the projector that adds a mean-of-all-patches token before the 16 patch tokens, and a
BART encoder-decoder, as transformers' Florence2VisionText2TextModelTester builds them (with
more than one stage, so that stage maps must be brought onto the token grid). The tokenizer is
byte-level BPE, as BART's ("Ġred"), with ``<s>``, ``<pad>``, ``</s>``, ``<unk>`` at BART's ids
and an ``<image>`` token. The image processor squashes any image to 64 x 64, as
Florence-2-base's squashes it to 768 x 768. Saved with ``save_pretrained`` so tests go through
the real ``from_pretrained`` path.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BartConfig,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", IMAGE_TOKEN]
BOS_ID, PAD_ID, EOS_ID, UNK_ID, IMAGE_TOKEN_ID = range(len(SPECIAL_TOKENS))
IMAGE_SIZE = 64  # model pixels per side
STRIDES = (4, 2, 2)
STAGES = len(STRIDES)
TOKEN_SIZE = 16  # model pixels per encoder token: the product of the strides
GRID = IMAGE_SIZE // TOKEN_SIZE  # 4 x 4 patch tokens
IMAGE_TOKENS = GRID * GRID + 1  # the mean-of-all-patches token first
ENCODER_LAYERS = 1
DECODER_LAYERS = 2
CORPUS = [
    "What does the image describe?",
    "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "A red circle and a blue square on the grass.",
    "Two green triangles above a dog; the dog is brown.",
] * 20


def tiny_bart_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (BART's kind of pieces, "Ġred"), BART's special ids, one image token."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(CORPUS, trainer)
    built = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    assert built.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    return built


def build_tiny_florence2(seed: int = 0) -> tuple[Florence2ForConditionalGeneration, Florence2Processor]:
    """A 3-stage DaViT / 1+2-layer BART Florence-2 on 64 px images, random weights, eager attention."""
    tokenizer = tiny_bart_tokenizer()
    config = Florence2Config(
        vision_config=Florence2VisionConfig(
            depths=(1, 1, 1),
            patch_size=(7, 3, 3),
            patch_stride=STRIDES,
            patch_padding=(3, 1, 1),
            patch_prenorm=(False, True, True),
            embed_dim=(16, 32, 32),
            num_heads=(2, 4, 4),
            num_groups=(2, 4, 4),
            window_size=4,
            drop_path_rate=0.0,
            projection_dim=32,
        ),
        text_config=BartConfig(
            vocab_size=len(tokenizer),
            d_model=32,
            encoder_layers=ENCODER_LAYERS,
            decoder_layers=DECODER_LAYERS,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            bos_token_id=BOS_ID,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            decoder_start_token_id=EOS_ID,
        ),
        image_token_id=IMAGE_TOKEN_ID,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    # Florence-2's generation config forces <s> after the decoder's start id </s>; random
    # weights would then repeat <s>, which no n-gram repeat lets them do (the real checkpoint's
    # no_repeat_ngram_size of 3 keeps its captions from looping the same way).
    model.generation_config.forced_bos_token_id = BOS_ID
    model.generation_config.no_repeat_ngram_size = 1
    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        image_seq_length=IMAGE_TOKENS,
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    return model.requires_grad_(False), processor
