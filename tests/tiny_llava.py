"""A tiny LLaVA-1.5 built from small configs with a tokenizer trained offline: no network.

CLIP vision tower (CLS token first, the processor resizes the short side and centre-crops),
a two-layer MLP projector and a Llama language model, as transformers' LlavaVisionText2TextModelTester
builds them; the tokenizer is a SentencePiece-style unigram model (Llama's kind of pieces,
"▁red") with LLaVA's "<image>" token and the llava-1.5-hf chat template. Saved with
``save_pretrained`` so tests go through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_TOKEN_ID = range(len(SPECIAL_TOKENS))
IMAGE_SIZE = 32  # crop side in model pixels
PATCH_SIZE = 8  # 4 x 4 patches + CLS in the vision tower; 16 image tokens in the LM sequence
VISION_LAYERS = 3
TEXT_LAYERS = 2
INSTRUCTION = "Describe this image in one sentence."
CORPUS = [
    f"USER: {INSTRUCTION} ASSISTANT: a red circle and a blue square.",
    "USER: What is in the picture? ASSISTANT: two green triangles above a dog on grass.",
    "a cat and dogs on the grass, a red square.",
] * 20

# llava-hf/llava-1.5-7b-hf's template: "USER: <image>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_llama_tokenizer() -> PreTrainedTokenizerFast:
    """Llama style: "▁" marks a word start, BOS first, "<image>" one special id."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=SPECIAL_TOKENS, unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
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


def build_tiny_llava(
    seed: int = 0, max_positions: int = 128, strategy: str = "default"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A 3-layer CLIP vision / 2-layer Llama LLaVA on 32 px crops (4 x 4 patches), random
    weights, eager attention, whose sequences hold at most ``max_positions`` ids. ``strategy``
    "default" drops CLIP's CLS before the projector (LLaVA-1.5); "full" keeps it as the first
    image token."""
    tokenizer = tiny_llama_tokenizer()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=VISION_LAYERS,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=16,
        ),
        text_config=LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=TEXT_LAYERS,
            vocab_size=len(tokenizer),
            max_position_embeddings=max_positions,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        ),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2 + (strategy == "full"),
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    return model.requires_grad_(False), processor
