"""A SmolVLM-style tokenizer built offline, for models with random weights (tests, benchmarks).

A GPT-2 style byte-level BPE trained on a few sentences, with SmolVLM's chat and image tokens
and its chat template: what a random-weight SmolVLM needs to caption and be explained without
downloading the checkpoint's tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

from models.smolvlm_explainer import END_OF_UTTERANCE, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, MAX_TILE_SIDE

BOS, PAD = "<|im_start|>", "<|endoftext|>"
IMAGE_TOKENS = [IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN] + [
    f"<row_{row}_col_{column}>" for row in range(1, MAX_TILE_SIDE + 1) for column in range(1, MAX_TILE_SIDE + 1)
]
CORPUS = [
    "User: Describe this image in one sentence.",
    "Assistant: a red circle and a blue square on green grass.",
    "Assistant: two dogs and a cat above a picture of circles.",
    "What colour is the square? Answer in one word.",
] * 10


def offline_smolvlm_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """SmolVLM's kind of tokenizer (GPT-2 style byte-level BPE) trained on ``CORPUS``, with its
    image and chat tokens and its chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, END_OF_UTTERANCE, *IMAGE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=END_OF_UTTERANCE,
        pad_token=PAD,
        unk_token=PAD,
        additional_special_tokens=IMAGE_TOKENS,
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast
