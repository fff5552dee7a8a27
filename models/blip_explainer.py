"""BLIP captioning explained: captions, teacher-forced token scores and token heatmaps.

Token alignment: for generated ids ``ids`` the decoder's ``logits[:, t - 1]`` scores
``ids[t]``. Position 0 is BOS ("[DEC]"), which generate() puts first; the forward pass
does not insert it, so the generated ids go back in as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration

from models.cam_methods import VISION_LAYER_METHODS, gradient_attention
from models.denormals import in_denormal_mode
from models.hooks import capture_outputs
from models.loading import BLIP_BASE, ProgressCallback, load_checkpoint, pick_device, resolve_model_dir
from utils.patch_utils import PatchGeometry

METHODS: tuple[str, ...] = ("hirescam", "gradcam", "cross_attention", "occlusion")
METHOD_LABELS = {
    "hirescam": "HiResCAM (gradient x activation), vision layers",
    "gradcam": "Grad-CAM (averaged gradients), vision layers",
    "cross_attention": "Gradient x cross-attention, text decoder layers",
    "occlusion": "Patch occlusion (drop in log p)",
}
# The method that measured best on the shapes benchmark (bench/faithfulness.py), shown first
# at its last entry, the mean over all decoder layers: pointing game 0.95 there, against 0.88 to
# 0.91 for any single decoder layer and 0.87 for HiResCAM's best layer.
DEFAULT_METHOD = "cross_attention"
# Occlusion needs one forward pass per occluded block; blocks of several patches keep
# BLIP-base (24 x 24 patches) near this many passes.
OCCLUSION_MAX_BLOCKS_PER_SIDE = 12
OCCLUSION_BATCH = 16

# A target maps log-probabilities (..., tokens, vocabulary) to one score per leading index.
Target = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CaptionWord:
    """One whole caption word and the ids that spell it: ``token_ids[start:end]``."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Caption:
    """A generated caption.

    Args:
        text: the decoded caption, prompt included.
        token_ids: every generated id: BOS, prompt pieces, caption pieces, [SEP].
        pieces: the word piece of each id (special tokens included).
        words: the caption's whole words after the prompt, WordPiece "##" pieces merged.
        prompt_length: number of ids before the first generated caption piece (BOS included).
    """

    text: str
    token_ids: tuple[int, ...]
    pieces: tuple[str, ...]
    words: tuple[CaptionWord, ...]
    prompt_length: int


@dataclass(frozen=True)
class WordMaps:
    """Relevance maps of one caption word, one per layer (for cross-attention, then their mean).

    Args:
        word: the explained word.
        method: key of METHODS.
        layer_names: one label per map, shallow to deep.
        cam_grid: (maps, rows, columns) float32 relevance on the patch grid, >= 0.
        score: the explained target (log p of the word, or the contrastive difference).
    """

    word: str
    method: str
    layer_names: tuple[str, ...]
    cam_grid: np.ndarray
    score: float


def token_log_prob_target(token_ids: Sequence[int], positions: Sequence[int]) -> Target:
    """Target: summed log p of the ids at ``positions``, each scored by the logits before it."""

    def target(log_probs: torch.Tensor) -> torch.Tensor:
        return sum(log_probs[..., position - 1, token_ids[position]] for position in positions)

    return target


def contrastive_target(token_ids: Sequence[int], position: int, foil_id: int) -> Target:
    """Target: log p(the caption's id) - log p(foil id) at one position ("why dog, not cat?")."""

    def target(log_probs: torch.Tensor) -> torch.Tensor:
        row = log_probs[..., position - 1, :]
        return row[..., token_ids[position]] - row[..., foil_id]

    return target


class PromptTooLongError(ValueError):
    """The prompt fills the model's token positions, leaving no room for a caption."""


class BlipExplainer:
    """Captions an image with BLIP and explains each caption word with heatmaps.

    One instance serves many threads at once: it holds no per-call state, and activations
    are captured per call by hooks that see only their own thread's forward passes.

    Args:
        model: a BlipForConditionalGeneration, frozen, in eval mode.
        processor: its BlipProcessor.
        device: where the model lives.
        flush_denormals: flush denormal floats to zero in the computing thread (see
            models.denormals); False only to measure what that saves.
    """

    def __init__(
        self,
        model: BlipForConditionalGeneration,
        processor,
        device: torch.device | None = None,
        flush_denormals: bool = True,
    ):
        self.model = model
        self.processor = processor
        self.device = device or next(model.parameters()).device
        self.flush_denormals = flush_denormals
        vision_config = model.config.vision_config
        size = processor.image_processor.size
        self.geometry = PatchGeometry(
            model_size=(size["height"], size["width"]),
            patch_size=vision_config.patch_size,
            resize_mode="squash",
        )
        # The last layer's raw output feeds only the final LayerNorm, and a LayerNorm's input
        # gradient is orthogonal to its input, so gradient x activation summed over channels is
        # exactly zero there. Its normalised output is what the decoder reads: use that instead.
        self.vision_layers = [*model.vision_model.encoder.layers[:-1], model.vision_model.post_layernorm]
        self.cross_attentions = [layer.crossattention.self for layer in model.text_decoder.bert.encoder.layer]
        tokenizer = processor.tokenizer
        self.special_ids = set(tokenizer.all_special_ids) | {model.config.text_config.bos_token_id}

    @classmethod
    def from_pretrained(
        cls, source: str = BLIP_BASE, device: str = "auto", on_progress: ProgressCallback | None = None
    ) -> BlipExplainer:
        """Load from a hub id, a local folder or "shapes-demo" (see models.loading)."""
        folder = resolve_model_dir(source, "blip", on_progress)
        torch_device = pick_device(device)
        model, processor = load_checkpoint(BlipForConditionalGeneration, AutoProcessor, folder, torch_device)
        return cls(model, processor, torch_device)

    def layer_names(self, method: str) -> tuple[str, ...]:
        """Labels of the maps a method returns, shallow to deep."""
        if method in VISION_LAYER_METHODS:
            count = len(self.vision_layers)
            return tuple(f"vision layer {index + 1}/{count}" for index in range(count))
        if method == "cross_attention":
            count = len(self.cross_attentions)
            per_layer = tuple(f"decoder cross-attention {index + 1}/{count}" for index in range(count))
            return (*per_layer, f"decoder cross-attention, mean of all {count} layers")
        if method == "occlusion":
            return ("image patches",)
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")

    def default_layer(self, method: str) -> int:
        """Index of the map shown first: the last one, i.e. the deepest vision layer or, for
        cross-attention, the mean over all decoder layers, which pointed best on the shapes
        benchmark (no single decoder layer did well on both colour and shape words)."""
        return len(self.layer_names(method)) - 1

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Processor output for RGB images: (batch, 3, height, width) float32 on the device."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt").pixel_values
        return pixels.to(self.device)

    @property
    def max_caption_tokens(self) -> int:
        """Most ids a caption may hold, BOS and prompt included: the text decoder's position
        limit (32 on the bundled demo, 512 on BLIP base). generate() would index past it."""
        return self.model.config.text_config.max_position_embeddings

    @in_denormal_mode
    @torch.no_grad()
    def caption(
        self, image: Image.Image, prompt: str = "", max_new_tokens: int = 30, num_beams: int = 1
    ) -> Caption:
        """Generate a caption (greedy when ``num_beams`` is 1), optionally continuing ``prompt``.

        At most ``max_new_tokens`` ids are generated, fewer when the prompt leaves less room
        under ``max_caption_tokens``.

        Raises:
            PromptTooLongError: the prompt leaves no room for a single new id.
        """
        pixel_values = self.pixel_values([image])
        prompt_ids = None
        prompt_length = 1  # BOS only
        if prompt.strip():
            prompt_ids = self.processor.tokenizer(prompt.strip(), return_tensors="pt").input_ids.to(self.device)
            prompt_length = prompt_ids.shape[1] - 1  # generate() drops the trailing [SEP]
        room = self.max_caption_tokens - prompt_length
        if room < 1:
            raise PromptTooLongError(
                f"The prompt takes {prompt_length} of the model's {self.max_caption_tokens} token positions, "
                "leaving none for the caption. Shorten the prompt."
            )
        generated = self.model.generate(
            pixel_values=pixel_values,
            input_ids=prompt_ids,
            max_new_tokens=min(max_new_tokens, room),
            num_beams=num_beams,
            do_sample=False,
        )
        return self.caption_from_ids(generated[0].tolist(), prompt_length)

    def caption_from_ids(self, token_ids: Sequence[int], prompt_length: int = 1) -> Caption:
        """Build a Caption (pieces, whole words) from generated ids."""
        tokenizer = self.processor.tokenizer
        token_ids = tuple(int(token_id) for token_id in token_ids)
        pieces = tuple(tokenizer.convert_ids_to_tokens(list(token_ids)))
        words: list[CaptionWord] = []
        for position in range(prompt_length, len(token_ids)):
            if token_ids[position] in self.special_ids:
                continue
            piece = pieces[position]
            if piece.startswith("##") and words and words[-1].end == position:
                previous = words[-1]
                words[-1] = CaptionWord(previous.text + piece[2:], previous.start, position + 1)
            else:
                words.append(CaptionWord(piece, position, position + 1))
        # BLIP's BOS ("[DEC]") is not always registered as special: drop every special id.
        text = tokenizer.decode([token_id for token_id in token_ids if token_id not in self.special_ids])
        return Caption(text, token_ids, pieces, tuple(words), prompt_length)

    @in_denormal_mode
    @torch.no_grad()
    def token_log_probs(self, images: Sequence[Image.Image], token_ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced log p of every id given each image, in one batched forward pass.

        Returns:
            (images, ids) float32; column 0 (BOS, never predicted) is NaN.
        """
        ids = torch.tensor([list(token_ids)], device=self.device).expand(len(images), -1)
        logits = self.model(pixel_values=self.pixel_values(images), input_ids=ids).logits  # (B, T, V)
        log_probs = logits[:, :-1].log_softmax(dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        nan_column = torch.full((len(images), 1), math.nan, device=self.device)
        return torch.cat([nan_column, log_probs], dim=1).float().cpu().numpy()

    def word_target(
        self, caption: Caption, word_index: int, piece: int | None = None, foil: str | None = None
    ) -> Target:
        """The target for one caption word.

        Args:
            caption: the caption the word belongs to.
            word_index: index into ``caption.words``.
            piece: explain only this piece of the word (0-based); None for all its pieces.
            foil: a contrasting word; the target becomes log p(word) - log p(foil) at the
                word's first piece. The foil must be a single piece of the vocabulary.
        """
        word = caption.words[word_index]
        positions = list(range(word.start, word.end))
        if piece is not None:
            positions = [positions[piece]]
        if foil is None:
            return token_log_prob_target(caption.token_ids, positions)
        foil_ids = self.processor.tokenizer(foil.strip(), add_special_tokens=False).input_ids
        if len(foil_ids) != 1:
            raise ValueError(f"the foil {foil!r} is not a single word piece of this model's vocabulary")
        return contrastive_target(caption.token_ids, positions[0], foil_ids[0])

    @in_denormal_mode
    def explain(
        self,
        image: Image.Image,
        caption: Caption,
        word_indices: Sequence[int] | None = None,
        method: str = DEFAULT_METHOD,
        piece: int | None = None,
        foil: str | None = None,
    ) -> list[WordMaps]:
        """Heatmaps of caption words for every layer, all words sharing one forward pass.

        Args:
            image: RGB image the caption was generated for.
            caption: from ``caption()``.
            word_indices: which of ``caption.words``; None explains them all.
            method: one of METHODS.
            piece, foil: see ``word_target``.
        Returns:
            One WordMaps per requested word, in order.
        """
        indices = range(len(caption.words)) if word_indices is None else list(word_indices)
        if not indices:
            return []
        targets = [self.word_target(caption, index, piece, foil) for index in indices]
        pixel_values = self.pixel_values([image])
        ids = torch.tensor([caption.token_ids], device=self.device)
        if method == "occlusion":
            scores, cam_tokens = self._occlusion_maps(pixel_values, ids, targets)
        else:
            scores, cam_tokens = self._gradient_maps(pixel_values, ids, targets, caption, indices, method)
        rows, columns = self.geometry.grid_shape
        cam_grid = cam_tokens.reshape(len(targets), -1, rows, columns).float().cpu().numpy()
        names = self.layer_names(method)
        return [
            WordMaps(caption.words[index].text, method, names, cam_grid[slot], float(scores[slot]))
            for slot, index in enumerate(indices)
        ]

    def _gradient_maps(
        self,
        pixel_values: torch.Tensor,
        ids: torch.Tensor,
        targets: Sequence[Target],
        caption: Caption,
        word_indices: Sequence[int],
        method: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (words,) and maps (words, maps, patches), one map per entry of ``layer_names``:
        one forward pass shared by all words, then one gradient call per word for every layer."""
        use_vision = method in VISION_LAYER_METHODS
        if not use_vision and method != "cross_attention":
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        modules = self.vision_layers if use_vision else self.cross_attentions
        # Frozen parameters: without an input that requires grad nothing would be differentiable.
        pixel_values = pixel_values.detach().requires_grad_(True)
        with torch.enable_grad(), capture_outputs(modules, output_index=0 if use_vision else 1) as captured:
            logits = self.model(pixel_values=pixel_values, input_ids=ids).logits  # (1, T, V)
            log_probs = logits[0].log_softmax(dim=-1)  # (T, V)
            scores = torch.stack([target(log_probs) for target in targets])  # (W,)
            # One backward pass per word over the one shared forward graph. (Batching them with
            # is_grads_batched=True, i.e. vmap, measured 50% slower on CPU for BLIP base.)
            per_word = [
                torch.autograd.grad(score, captured, retain_graph=slot < len(targets) - 1)
                for slot, score in enumerate(scores)
            ]
        gradients = [torch.stack(layer_gradients) for layer_gradients in zip(*per_word, strict=True)]  # (W, 1, T, D)
        if use_vision:
            cam_function = VISION_LAYER_METHODS[method]
            maps = [
                cam_function(activation[:, 1:], gradient[:, :, 1:])[:, 0]  # drop CLS -> (W, patches)
                for activation, gradient in zip(captured, gradients, strict=True)
            ]
        else:
            maps = [
                self._cross_attention_map(attention, gradient, caption, word_indices)
                for attention, gradient in zip(captured, gradients, strict=True)
            ]
            # Every layer's cross-attention carries part of the image evidence to the word, so the
            # last map pools them; a mean rather than a sum keeps it on the layers' scale, so a
            # colour scale shared with the single layers still shows them.
            maps.append(torch.stack(maps).mean(dim=0))
        return scores.detach(), torch.stack(maps, dim=1).detach()

    @staticmethod
    def _cross_attention_map(
        attention: torch.Tensor, gradient: torch.Tensor, caption: Caption, word_indices: Sequence[int]
    ) -> torch.Tensor:
        """(W, patches) relevance from one decoder layer's cross-attention.

        Uses the query rows that predict each word's pieces (row t - 1 predicts id t).

        Args:
            attention: (1, heads, ids, 1 + patches) attention probabilities.
            gradient: (W, 1, heads, ids, 1 + patches).
        """
        maps = []
        for slot, index in enumerate(word_indices):
            word = caption.words[index]
            rows = slice(word.start - 1, word.end - 1)
            relevance = gradient_attention(
                attention[0, :, rows].transpose(0, 1), gradient[slot, 0, :, rows].transpose(0, 1)
            )  # (pieces, 1 + patches)
            maps.append(relevance.sum(dim=0)[1:])
        return torch.stack(maps)

    @torch.no_grad()
    def _occlusion_maps(
        self, pixel_values: torch.Tensor, ids: torch.Tensor, targets: Sequence[Target]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (words,) and maps (words, 1, patches): the drop of each target when a block
        of patches is set to the normalised dataset mean (zero), batched forward passes."""
        rows, columns = self.geometry.grid_shape
        patch = self.geometry.patch_size
        block = max(1, math.ceil(max(rows, columns) / OCCLUSION_MAX_BLOCKS_PER_SIDE))
        blocks = [(row, column) for row in range(0, rows, block) for column in range(0, columns, block)]

        def scores_of(batch_pixels: torch.Tensor) -> torch.Tensor:  # -> (B, W)
            logits = self.model(pixel_values=batch_pixels, input_ids=ids.expand(len(batch_pixels), -1)).logits
            log_probs = logits.log_softmax(dim=-1)
            return torch.stack([target(log_probs) for target in targets], dim=-1)

        base_scores = scores_of(pixel_values)[0]  # (W,)
        cam = torch.zeros(len(targets), rows, columns, device=self.device)
        for first in range(0, len(blocks), OCCLUSION_BATCH):
            chunk = blocks[first : first + OCCLUSION_BATCH]
            occluded = pixel_values.repeat(len(chunk), 1, 1, 1)
            for slot, (row, column) in enumerate(chunk):
                occluded[slot, :, row * patch : (row + block) * patch, column * patch : (column + block) * patch] = 0
            drops = torch.relu(base_scores - scores_of(occluded))  # (B, W)
            for slot, (row, column) in enumerate(chunk):
                cam[:, row : row + block, column : column + block] = drops[slot, :, None, None]
        return base_scores, cam.reshape(len(targets), 1, rows * columns)
