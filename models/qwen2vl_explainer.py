"""Qwen2-VL (and, at the end, Qwen2.5-VL and Qwen3-VL, each a small table of differences):
image tokens written into the language model's sequence, read by its self-attention.

What differs from the other families:
- Captions come through the processor's chat template, with an instruction ("Describe this image
  in one sentence." unless the sidebar gives another); the answer alone holds explainable words:
  ``prompt_length`` counts every id before it (system prompt, image tokens, instruction, template).
- The processor keeps the aspect ratio (``smart_resize``: multiples of patch x merge = 28 px for
  the real checkpoints, pixel count between its min and max pixels), and ``pixel_values`` are
  flattened patches, (patches, 3 x 2 x 14 x 14), with ``image_grid_thw``; the patches come in
  merge-block order: each 2x2 block of the grid is contiguous, blocks row-major.
- After the vision tower, a merger turns each 2x2 block into one language-model token; the
  language model places those tokens with 3D (M-RoPE) positions computed from ``image_grid_thw``
  and the ids' modality (``mm_token_type_ids``: 1 at image tokens, 0 elsewhere).
- No CLS token anywhere: no method drops a first token.

Every map is in row-major *patch* order (the vision tower's patches, ``patch_size`` model pixels
each), which is what ``image_geometry`` describes. Vision-tower maps are reordered out of the
merge-block order; a language-model token's relevance (attention) goes to each of the four
patches of its block, as occlusion gives each patch of a block its block's drop.

Thread safety: the model's forward stores M-RoPE offsets on the shared model (``rope_deltas``);
the teacher-forced pass computes its positions itself and passes them, so it stores nothing, and
a fresh ``generate()`` never reads what another thread stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.vision_utils import get_vision_window_index

from models.cam_methods import hires_cam
from models.denormals import in_denormal_mode
from models.explainer import (
    DEFAULT_INSTRUCTION,
    INSTRUCTION_HELP,
    INSTRUCTION_LABEL,
    Caption,
    CaptionerExplainer,
    LayerRelevance,
    Method,
    OcclusionMethod,
    image_token_attention_relevance,
    language_attention_methods,
    patch_token_relevance,
    projector_method,
    switch_to_eager_attention,
    vision_layer_methods,
)
from utils.patch_utils import ImageGeometry, aspect_resize_geometry

IMAGE_TOKEN_TYPE = 1  # mm_token_type_ids: text 0, image 1, video 2

VISION_BLOCK_LABELS = {
    "hirescam": "HiResCAM (gradient x activation), vision tower blocks",
    "gradcam": "Grad-CAM (averaged gradients), vision tower blocks",
}


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with its image processor and tokenizer only.

    In transformers 5 the full processor insists on a video processor, and that needs
    torchvision, which this project cannot install. A checkpoint folder saved with a video
    processor section still loads: only the sections named here are read.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` with its image processor and tokenizer only (see above)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` with its image processor and tokenizer only (see above)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def merge_block_order(grid_shape: tuple[int, int], merge_size: int) -> torch.Tensor:
    """For each patch of a (rows, columns) grid, row-major, its index in the processor's
    flattened ``pixel_values`` (and in the vision tower's tokens): 2x2 (merge_size^2) blocks
    are contiguous, the blocks themselves row-major."""
    rows, columns = grid_shape
    row = torch.arange(rows)[:, None]
    column = torch.arange(columns)[None, :]
    block = (row // merge_size) * (columns // merge_size) + column // merge_size
    return (block * merge_size**2 + (row % merge_size) * merge_size + column % merge_size).ravel()


def merged_token_of_patch(grid_shape: tuple[int, int], merge_size: int) -> torch.Tensor:
    """For each patch of a (rows, columns) grid, row-major, the image token (after the merger,
    in sequence order) that covers it."""
    rows, columns = grid_shape
    row = torch.arange(rows)[:, None]
    column = torch.arange(columns)[None, :]
    return ((row // merge_size) * (columns // merge_size) + column // merge_size).ravel()


def flattened_patch_relevance(cam_function) -> LayerRelevance:
    """A CAM formula on a vision-tower layer whose tokens are (patches, channels) without a
    batch dimension (Qwen2-VL's blocks); no CLS token, so every token is a patch."""
    per_token = patch_token_relevance(cam_function, first_patch_token=0)

    def relevance(activation, gradients, caption, word_indices):  # (N, D), (W, N, D)
        return per_token(activation[None], gradients[:, None], caption, word_indices)

    return relevance


class Qwen2VLExplainer(CaptionerExplainer):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``) explained word by word.

    The language model's attention probabilities are needed, so the constructor switches the
    language model to eager attention (SDPA returns none); the vision tower keeps its own.
    """

    model_class = Qwen2VLForConditionalGeneration
    processor_class = ImageOnlyQwen2VLProcessor
    model_types = ("qwen2_vl",)
    # "shapes-demo" means the BLIP demo, which check_model_type refuses here; the bundled Qwen2-VL
    # is "shapes-demo-decoder" (models/loading.py).
    demo_component = "blip"
    default_method = "attention_contrast"
    prompt_label = INSTRUCTION_LABEL
    prompt_help = INSTRUCTION_HELP
    text_is_answer_only = True

    def __init__(self, model: Qwen2VLForConditionalGeneration, processor, device=None, flush_denormals: bool = True):
        switch_to_eager_attention(model, ["text_config"])
        config = model.config
        vision = model.model.visual
        # The last block's raw output feeds only the merger's LayerNorm, whose input gradient is
        # orthogonal to its input: gradient x activation is exactly zero there (as BLIP's last
        # layer). The normalised output is what the merger reads: use that instead.
        self.vision_layers = [*vision.blocks[:-1], self.merger_norm(vision)]
        self.attentions = [layer.self_attn for layer in model.model.language_model.layers]
        self.image_token_id = config.image_token_id
        image_processor = processor.image_processor
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size
        model_sizes = (config.vision_config.patch_size, config.vision_config.spatial_merge_size)
        if (self.patch_size, self.merge_size) != model_sizes:
            raise ValueError(
                f"the image processor's patch {self.patch_size} x merge {self.merge_size} does not match the "
                f"model's {model_sizes[0]} x {model_sizes[1]}"
            )
        tokenizer = processor.tokenizer
        eos_ids: set[int | None] = set()
        # The text config names EOS for Qwen2-VL and Qwen2.5-VL, the generation config for all.
        for eos in (getattr(config.text_config, "eos_token_id", None), model.generation_config.eos_token_id):
            eos_ids.update(eos if isinstance(eos, list) else [eos])
        template_ids = set(tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])) - {tokenizer.unk_token_id}
        self.special_ids = frozenset(
            {
                *tokenizer.all_special_ids,
                *eos_ids,
                *template_ids,
                config.image_token_id,
                config.video_token_id,
                config.vision_start_token_id,
                config.vision_end_token_id,
            }
            - {None}
        )
        super().__init__(model, processor, device, flush_denormals)

    @staticmethod
    def merger_norm(vision: nn.Module) -> nn.Module:
        """The merger's per-patch norm, which reads the last block's output."""
        return vision.merger.ln_q

    # ------------------------------------------------------------ geometry

    def resized_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) in model pixels that the processor resizes an image of (width, height) to."""
        image_processor = self.processor.image_processor
        width, height = image_size
        return smart_resize(
            height,
            width,
            factor=self.patch_size * self.merge_size,
            min_pixels=image_processor.size["shortest_edge"],
            max_pixels=image_processor.size["longest_edge"],
        )

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """One view over the whole image, a grid of ``patch_size`` patches (not merged tokens),
        row-major."""
        return aspect_resize_geometry(image_size, self.resized_size(image_size), self.patch_size)

    @staticmethod
    def _grid_shape(inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        _, rows, columns = (int(value) for value in inputs["image_grid_thw"][0])
        return rows, columns

    def patch_order(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """For each row-major patch, its index among the flattened patches (merge-block order)."""
        return merge_block_order(self._grid_shape(inputs), self.merge_size).to(self.device)

    def vision_token_order(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """For each row-major patch, its token's index in the vision blocks' outputs (Qwen2-VL:
        the flattened patches' own order)."""
        return self.patch_order(inputs)

    def image_token_of_patch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """For each row-major patch, the image token (in sequence order) that covers it."""
        return merged_token_of_patch(self._grid_shape(inputs), self.merge_size).to(self.device)

    # ------------------------------------------------------------ methods

    def build_methods(self) -> dict[str, Method]:
        vision_count = len(self.vision_layers)
        vision_names = tuple(
            f"vision block {index + 1}/{vision_count}" for index in range(vision_count - 1)
        ) + (f"vision block {vision_count}/{vision_count} (normalised, as the merger reads it)",)
        vision_methods = vision_layer_methods(
            self.vision_layers, flattened_patch_relevance, vision_names, VISION_BLOCK_LABELS,
            token_of_patch=self.vision_token_order,
        )
        attention_methods = language_attention_methods(
            self.attentions,
            image_token_attention_relevance(self.image_token_id),
            token_of_patch=self.image_token_of_patch,
        )
        # The merger's output: one token per merge block, as the language model reads them
        # (Qwen3-VL's deepstack features reach it besides, from blocks whose own maps count them).
        projector = projector_method(
            self.model.model.visual.merger,
            flattened_patch_relevance(hires_cam),
            token_of_patch=self.merger_token_of_patch,
        )
        return {**attention_methods, **vision_methods, "projector": projector, "occlusion": OcclusionMethod()}

    def merger_token_of_patch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """For each row-major patch, the merger's output row that covers it (Qwen2-VL: the
        image tokens' sequence order)."""
        return self.image_token_of_patch(inputs)

    def vision_tower_layers(self) -> Sequence[nn.Module]:
        return self.model.model.visual.blocks

    def occluded_inputs(self, inputs: dict[str, torch.Tensor], blocks: Sequence[Sequence[int]]) -> dict:
        """One image per block, its block's flattened patches set to zero (the normalised mean)."""
        pixel_values = inputs["pixel_values"]  # (patches, 3 x 2 x p x p) of one image
        order = self.patch_order(inputs)
        patches = pixel_values.shape[0]
        occluded = pixel_values.repeat(len(blocks), 1)
        for slot, block in enumerate(blocks):
            occluded[slot * patches + order[list(block)]] = 0
        return {**inputs, "pixel_values": occluded, "image_grid_thw": inputs["image_grid_thw"].repeat(len(blocks), 1)}

    # ------------------------------------------------------------ forward passes

    def model_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        batch = self.processor.image_processor(images=list(images), return_tensors="pt")
        grids = batch["image_grid_thw"]
        if not bool((grids == grids[0]).all()):
            raise ValueError("images of one batch must share one size: each fills the same image tokens")
        return {"pixel_values": batch["pixel_values"].to(self.device), "image_grid_thw": grids.to(self.device)}

    def teacher_forced_logits(
        self, inputs: dict[str, torch.Tensor], ids: torch.Tensor, first_row: int = 0
    ) -> torch.Tensor:
        mm_token_type_ids = (ids == self.image_token_id).long() * IMAGE_TOKEN_TYPE
        # Positions computed here rather than by forward(), which would store them on the shared
        # model (``rope_deltas``) that other threads' generate() calls use.
        position_ids, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=inputs["image_grid_thw"]
        )
        return self.model(
            input_ids=ids,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=mm_token_type_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=ids.shape[1] - first_row,
        ).logits

    def prompt_text(self, instruction: str) -> str:
        """The chat template's text for one image and the instruction, ready for the answer."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @in_denormal_mode
    @torch.no_grad()
    def caption(
        self, image: Image.Image, prompt: str = "", max_new_tokens: int = 30, num_beams: int = 1
    ) -> Caption:
        """Answer ``prompt`` (the instruction; empty: DEFAULT_INSTRUCTION) about the image."""
        text = self.prompt_text(prompt.strip() or DEFAULT_INSTRUCTION)
        batch = self.processor(images=[image.convert("RGB")], text=[text], return_tensors="pt")
        batch = {name: value.to(self.device) for name, value in batch.items()}
        prompt_length = batch["input_ids"].shape[1]
        generated = self.model.generate(
            **batch,
            max_new_tokens=self.new_token_budget(prompt_length, max_new_tokens),
            num_beams=num_beams,
            do_sample=False,
        )
        return self.caption_from_ids(generated[0].tolist(), prompt_length)


class Qwen2_5_VLExplainer(Qwen2VLExplainer):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL but for, in this file's terms,

    | what                          | Qwen2-VL                   | Qwen2.5-VL                          |
    | ----------------------------- | -------------------------- | ----------------------------------- |
    | vision blocks' token order    | the flattened patches'     | merge blocks regrouped by attention |
    |                               | (merge-block order)        | window (``get_vision_window_index``)|
    | merger's first norm (``ln_q``)| LayerNorm                  | RMSNorm (the same zero-gradient     |
    |                               |                            | trap: read its output)              |

    Same image processor, chat template, pixels, M-RoPE positions and merged image-token order
    (the tower undoes the window order after the merger), so captions, attention, occlusion
    and the geometry are Qwen2-VL's.
    """

    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = ImageOnlyQwen2_5_VLProcessor
    model_types = ("qwen2_5_vl",)

    def window_slot_of_block(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """For each merge block (row-major), its place in the tower's window order."""
        visual = self.model.model.visual
        window_index, _ = get_vision_window_index(
            inputs["image_grid_thw"][:1].cpu(),
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        return torch.argsort(window_index).to(self.device)

    def vision_token_order(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """For each row-major patch, its token's index in the vision blocks' outputs: the tower
        moves whole merge blocks (``merge_size``^2 tokens) into window order."""
        unit = self.merge_size**2
        flattened = self.patch_order(inputs)
        return self.window_slot_of_block(inputs)[flattened // unit] * unit + flattened % unit

    def merger_token_of_patch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The merger's output is still in window order (the tower undoes it afterwards)."""
        return self.window_slot_of_block(inputs)[self.image_token_of_patch(inputs)]


class Qwen3VLExplainer(Qwen2VLExplainer):
    """Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2-VL's pixels, token order, chat
    template and M-RoPE image positions (patches of 16 model pixels, so multiples of 32, read
    from its processor like every size here), but

    | what                        | Qwen2-VL              | Qwen3-VL                                  |
    | --------------------------- | --------------------- | ----------------------------------------- |
    | merger's per-patch norm     | ``merger.ln_q``       | ``merger.norm``                           |
    | vision features the LM gets | the merger's output   | also "deepstack" features of a few blocks,|
    |                             |                       | added to the first LM layers' image tokens|

    Deepstack changes no method here: a block's gradient counts every path to the word.
    """

    model_class = Qwen3VLForConditionalGeneration
    processor_class = ImageOnlyQwen3VLProcessor
    model_types = ("qwen3_vl",)

    @staticmethod
    def merger_norm(vision: nn.Module) -> nn.Module:
        return vision.merger.norm
