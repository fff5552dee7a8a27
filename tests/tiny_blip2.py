"""A tiny BLIP-2 (OPT language model) built from small configs with a tokenizer trained offline.

A ViT vision tower (CLS first, 4 x 4 patches of 8 px on a 32 px squashed image), a 4-layer
Q-Former whose every second layer cross-attends to the vision tokens (cross_attention_frequency
2, as Salesforce/blip2-opt-2.7b's), 6 learned queries, and a 2-layer OPT, as transformers'
Blip2ForConditionalGenerationDecoderOnlyModelTester builds them. The vision config's
``initializer_range`` defaults to 1e-10 (every weight zero in effect): it is set here. The
tokenizer is byte-level BPE with OPT's ids (``</s>`` = 2 is BOS and EOS) and an ``<image>``
token. Saved with ``save_pretrained`` so tests go through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
PAD_ID, EOS_ID = 1, 2
BOS_ID = EOS_ID  # OPT starts every sequence with </s>
IMAGE_SIZE = 32
PATCH_SIZE = 8
PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
VISION_LAYERS = 3
QFORMER_LAYERS = 4
CROSS_ATTENTION_LAYERS = QFORMER_LAYERS // 2
QUERIES = 6
TEXT_LAYERS = 2
CORPUS = [
    "a red circle and a blue square on the grass.",
    "Question: what is in the picture? Answer: two green triangles above a dog.",
    "a photo of a cat and dogs on the grass, a red square.",
] * 20


def tiny_opt_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (OPT's kind of pieces, "Ġred"), </s> first as OPT's BOS. Blip2Processor
    adds "<image>" after the vocabulary, as the real checkpoint's tokenizer holds it."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_blip2(seed: int = 0) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A 3-layer ViT / 4-layer Q-Former (6 queries) / 2-layer OPT BLIP-2 on 32 px images, random
    weights, eager attention."""
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor, tiny_opt_tokenizer(), num_query_tokens=QUERIES)
    tokenizer = processor.tokenizer
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=VISION_LAYERS,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            initializer_range=0.02,
        ),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=QFORMER_LAYERS,
            num_attention_heads=4,
            cross_attention_frequency=2,
            encoder_hidden_size=32,
            vocab_size=len(tokenizer),
        ),
        text_config=OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            vocab_size=len(tokenizer),
            max_position_embeddings=128,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        ),
        num_query_tokens=QUERIES,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content),
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    # Random weights would write </s> at once. OPT's output layer is its input embedding: a zero
    # row for </s> gives it logit 0 everywhere, below the best of the other pieces, so a caption
    # runs to its length limit.
    with torch.no_grad():
        model.get_input_embeddings().weight[EOS_ID] = 0
    return model.requires_grad_(False), processor
