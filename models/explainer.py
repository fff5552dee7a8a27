"""One interface for every captioning vision-language model, and the engine the families share.

A family (one file, e.g. models/blip_explainer.py) says only what differs: how it loads and
captions, how a teacher-forced forward pass scores ids, which modules each explanation method
reads and how their tokens become patch relevance, and how its patches sit on the image.
Everything else lives here once: result types, targets, one forward pass plus one gradient call
per word for every layer, occlusion in batches, the per-call hooks, the sanity-check copy.

Token alignment, for every family: the logits at position ``t - 1`` score the id at ``t``.
Whole words come from the tokenizer's own decoding, never from a family's piece markers, so
WordPiece ("##s"), SentencePiece ("▁red") and byte-level BPE ("Ġred") all give the same words.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.cam_methods import VISION_LAYER_METHODS, gradient_attention, softmax_gradient_attention
from models.denormals import in_denormal_mode
from models.hooks import capture_outputs
from models.loading import PretrainedExplainer, available_memory_bytes
from utils.patch_utils import ImageGeometry, squash_geometry

# A word is a run of letters and digits (with inner hyphens or apostrophes), or one mark of
# punctuation: "square." is the words "square" and ".", as a reader would point at them.
WORD_PATTERN = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")


@dataclass(frozen=True)
class CaptionWord:
    """One whole caption word and the ids that spell it: ``token_ids[start:end]``."""

    text: str
    start: int
    end: int


def caption_words(
    tokenizer, token_ids: Sequence[int], first_position: int, special_ids: Collection[int]
) -> tuple[CaptionWord, ...]:
    """The whole words of a caption, from the tokenizer's own decoding.

    Each piece's share of the text is read off by decoding growing prefixes; a piece that
    decodes to white space alone (SentencePiece's lone "▁") joins the word after it.

    Args:
        tokenizer: a transformers tokenizer (slow or fast).
        token_ids: every id of the sequence: prompt, template and answer alike.
        first_position: index of the first id that may be part of an explainable word;
            earlier ids (BOS, prompt, image and template tokens) never are.
        special_ids: ids that are never words (BOS, EOS, padding, image tokens, ...).
    Returns:
        The words in order.
    """
    positions = [p for p in range(first_position, len(token_ids)) if token_ids[p] not in special_ids]
    ids = [token_ids[p] for p in positions]
    decode = lambda pieces: tokenizer.decode(pieces, clean_up_tokenization_spaces=False)  # noqa: E731
    text = decode(ids)
    ends = [min(len(decode(ids[: count + 1])), len(text)) for count in range(len(ids))]
    spans = [match.span() for match in WORD_PATTERN.finditer(text)]
    pieces_of_word: list[list[int]] = [[] for _ in spans]
    start = 0
    for position, end in zip(positions, ends, strict=True):
        word = _word_at(spans, start)
        if word is not None:
            pieces_of_word[word].append(position)
        start = max(start, end)
    return tuple(
        CaptionWord(text[span[0] : span[1]], pieces[0], pieces[-1] + 1)
        for span, pieces in zip(spans, pieces_of_word, strict=True)
        if pieces
    )


def _word_at(spans: Sequence[tuple[int, int]], start: int) -> int | None:
    """Index of the word that a piece starting at character ``start`` belongs to: the first word
    that does not end before it (a piece of white space alone thus joins the next word); None
    after the last word."""
    return next((index for index, (_, word_end) in enumerate(spans) if word_end > start), None)


@dataclass(frozen=True)
class Caption:
    """A generated caption.

    Args:
        text: the decoded caption, prompt included.
        token_ids: every id the explanation's forward pass reads, in order (BOS, prompt,
            caption pieces, end of sequence).
        pieces: the piece of each id (special tokens included).
        words: the caption's whole words after the prompt.
        prompt_length: number of ids before the first generated caption piece (BOS included).
    """

    text: str
    token_ids: tuple[int, ...]
    pieces: tuple[str, ...]
    words: tuple[CaptionWord, ...]
    prompt_length: int


@dataclass(frozen=True)
class WordMaps:
    """Relevance maps of one caption word, one per entry of ``layer_names``.

    Args:
        word: the explained word.
        method: key of the explainer's ``methods``.
        layer_names: one label per map, shallow to deep.
        cam_patches: (maps, patches) float32 relevance of every patch the model saw, >= 0;
            the explainer's ``image_geometry`` puts the patches on the image.
        score: the explained target (log p of the word, or the contrastive difference).
        foil: the word it is contrasted with (a given foil, or the model's runner-up); None
            when the target is the word's log p.
    """

    word: str
    method: str
    layer_names: tuple[str, ...]
    cam_patches: np.ndarray
    score: float
    foil: str | None = None


@dataclass(frozen=True)
class Decoding:
    """How captions are generated: optional prompt, length limit, beam width (1 = greedy)."""

    prompt: str = ""
    max_new_tokens: int = 30
    num_beams: int = 1


# A target maps log-probabilities (..., rows, vocabulary) of the logits' rows from ``first_row``
# on to one score per leading index. (A chat model's prompt holds a thousand ids and more, and
# its vocabulary 150 000: the rows before the answer would cost gigabytes and are never read.)
Target = Callable[[torch.Tensor, int], torch.Tensor]


def token_log_prob_target(token_ids: Sequence[int], positions: Sequence[int]) -> Target:
    """Target: summed log p of the ids at ``positions``, each scored by the logits before it."""

    def target(log_probs: torch.Tensor, first_row: int) -> torch.Tensor:
        return sum(log_probs[..., position - 1 - first_row, token_ids[position]] for position in positions)

    return target


# A foil id that stands for "the model's own runner-up", resolved in the gradient pass
# (``CaptionerExplainer.runner_up_id``); never a vocabulary id.
RUNNER_UP = -1


def contrast_position(caption: Caption, word_index: int, piece: int | None) -> int:
    """Where a contrastive target compares a word with its foil: the chosen piece, else the first."""
    word = caption.words[word_index]
    return list(range(word.start, word.end))[piece or 0]


def contrastive_target(token_ids: Sequence[int], position: int, foil_id: int) -> Target:
    """Target: log p(the caption's id) - log p(foil id) at one position ("why dog, not cat?")."""

    def target(log_probs: torch.Tensor, first_row: int) -> torch.Tensor:
        row = log_probs[..., position - 1 - first_row, :]
        return row[..., token_ids[position]] - row[..., foil_id]

    return target


# How one captured layer becomes patch relevance: (activation (1, ...), gradients (words, 1, ...),
# caption, word indices) -> (words, patches).
LayerRelevance = Callable[[torch.Tensor, torch.Tensor, Caption, Sequence[int]], torch.Tensor]
# How one attention row's probabilities and gradients, (..., heads, keys) each, become relevance
# per key (models.cam_methods: gradient_attention, softmax_gradient_attention).
AttentionPooling = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# How all of a method's captured modules together become its maps: (activations, gradients,
# caption, word indices) -> one (words, patches) map per map name.
ComposedRelevance = Callable[
    [Sequence[torch.Tensor], Sequence[torch.Tensor], Caption, Sequence[int]], list[torch.Tensor]
]


@dataclass(frozen=True)
class GradientMethod:
    """A method that reads captured modules and the target's gradient with respect to them.

    Args:
        label: what the page calls it.
        modules: the modules whose outputs are captured, shallow to deep.
        layer_names: one label per module.
        relevance: turns one module's output and gradients into patch relevance.
        output_index: which element of a module's tuple output to capture.
        pooled_name: if set, a last map is appended: the mean over all modules' maps, so named.
        token_of_patch: if set, (model inputs) -> (patches,) index: for each patch of the
            geometry, in its order, the token of ``relevance``'s output it takes (for tokens that
            are not in row-major patch order, or that cover several patches); None when
            ``relevance`` already returns one value per patch in the geometry's order.
        attention_heads: for a method that reads a decoder-only model's self-attention over
            the whole sequence, the heads of all its modules together: its memory grows with
            the square of the sequence (see ``check_attention_memory``).
        compose: if set, it makes the maps instead of ``relevance`` (then None), from all the
            modules' outputs and gradients at once, one map per ``layer_names`` entry: for a
            map that carries one module's relevance through another's attention (BLIP-2: the
            language model's attention to the queries, through the Q-Former to the patches).
        contrast_runner_up: explain each word against the model's runner-up where no foil is
            given: the target is log p(word) - log p(the most probable other id) at the word's
            first piece ("why red, not blue?"), so evidence that serves both alike (where the
            next object is, say) cancels out.
    """

    label: str
    modules: tuple[nn.Module, ...]
    layer_names: tuple[str, ...]
    relevance: LayerRelevance | None
    output_index: int = 0
    pooled_name: str | None = None
    token_of_patch: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    attention_heads: int = 0
    compose: ComposedRelevance | None = None
    contrast_runner_up: bool = False

    @property
    def map_names(self) -> tuple[str, ...]:
        return (*self.layer_names, self.pooled_name) if self.pooled_name else self.layer_names


@dataclass(frozen=True)
class OcclusionMethod:
    """The drop in the target when blocks of patches are occluded, in batched forward passes."""

    label: str = "Patch occlusion (drop in log p)"
    map_names: tuple[str, ...] = ("image patches",)


Method = GradientMethod | OcclusionMethod


def patch_token_relevance(cam_function, first_patch_token: int) -> LayerRelevance:
    """Relevance of a vision layer's patch tokens by a CAM formula (models.cam_methods).

    Args:
        cam_function: (activations, gradients) -> relevance per token.
        first_patch_token: tokens before it are not patches (1 for a CLS token, 0 for none).
    """

    def relevance(activation, gradients, caption, word_indices):  # (1, T, D), (W, 1, T, D)
        return cam_function(activation[:, first_patch_token:], gradients[:, :, first_patch_token:])[:, 0]

    return relevance


def tiled_token_relevance(cam_function) -> LayerRelevance:
    """Relevance by a CAM formula on a vision layer that sees one image as several views
    (tiles and a global view: its batch), none with a CLS token: every token of every view in
    order, (views, T, D) -> (W, views x T)."""

    def relevance(activation, gradients, caption, word_indices):  # (views, T, D), (W, views, T, D)
        return cam_function(activation, gradients).flatten(start_dim=1)

    return relevance


VISION_METHOD_LABELS = {
    "hirescam": "HiResCAM (gradient x activation), vision layers",
    "gradcam": "Grad-CAM (averaged gradients), vision layers",
}
# Each tile is an image of its own to the vision tower: Grad-CAM's average is per tile.
TILED_VISION_LABELS = {**VISION_METHOD_LABELS, "gradcam": "Grad-CAM (averaged gradients per tile), vision layers"}


def occlude_view_patches(
    pixel_values: torch.Tensor,
    blocks: Sequence[Sequence[int]],
    view_token_of_patch: Sequence[int],
    grid_columns: int,
    patch_size: int,
) -> torch.Tensor:
    """(1, views, 3, S, S) pixels of one image seen as several views (tiles and a global view),
    repeated once per block of patch ids, each block's patches set to zero (the normalised
    mean). ``view_token_of_patch[patch]`` is the patch's token among all views' patches (view
    after view, row-major, ``grid_columns`` a row)."""
    per_view = pixel_values.shape[-2] // patch_size * grid_columns
    occluded = pixel_values.repeat(len(blocks), 1, 1, 1, 1)
    for slot, block in enumerate(blocks):
        for patch_id in block:
            view, local = divmod(int(view_token_of_patch[patch_id]), per_view)
            top, left = (index * patch_size for index in divmod(local, grid_columns))
            occluded[slot, view, :, top : top + patch_size, left : left + patch_size] = 0
    return occluded


def vision_layer_methods(
    layers: Sequence[nn.Module],
    relevance_for: Callable[[Callable], LayerRelevance],
    layer_names: tuple[str, ...] | None = None,
    labels: dict[str, str] = VISION_METHOD_LABELS,
    **options,
) -> dict[str, Method]:
    """HiResCAM and Grad-CAM on a vision tower's layers, one map per layer.

    Args:
        layers: the modules read, shallow to deep.
        relevance_for: a CAM formula (models.cam_methods) -> the family's relevance function,
            which knows where the patch tokens are in a layer's output.
        layer_names: one label per layer; "vision layer i/n" when None.
        labels: the page's label of each method.
        options: passed on to every GradientMethod (e.g. ``token_of_patch``).
    """
    names = layer_names or tuple(f"vision layer {index + 1}/{len(layers)}" for index in range(len(layers)))
    return {
        key: GradientMethod(label, tuple(layers), names, relevance_for(VISION_LAYER_METHODS[key]), **options)
        for key, label in labels.items()
    }


def attention_layers_method(
    label: str, layer_label: str, attentions: Sequence[nn.Module], relevance: LayerRelevance, **options
) -> Method:
    """Gradient x attention in a stack of attention layers (eager attention: the probabilities
    are the second output), one map per layer ("``layer_label`` i/n"), then their mean: every
    layer carries part of the image evidence to the word.

    Args:
        label: what the page calls the method.
        layer_label: what a map is called, before its index.
        attentions: the attention modules, shallow to deep.
        relevance: turns one layer's probabilities and gradients into patch relevance.
        options: passed on to the GradientMethod (e.g. ``token_of_patch``).
    """
    count = len(attentions)
    return GradientMethod(
        label,
        tuple(attentions),
        tuple(f"{layer_label} {index + 1}/{count}" for index in range(count)),
        relevance,
        output_index=1,  # (attention output, attention probabilities)
        pooled_name=f"{layer_label}, mean of all {count} layers",
        **options,
    )


def language_attention_methods(
    attentions: Sequence[nn.Module], relevance: LayerRelevance, **options
) -> dict[str, Method]:
    """Gradient x attention in a decoder-only model's language layers, one map per layer, then
    their mean: of the word against the model's runner-up ("attention_contrast", the family's
    default: on the decoder-only shapes demo it points at the right object and deletes the word
    faster than the word's own log p does) and of the word's log p ("attention").
    Its memory grows with the square of the sequence: ``attention_heads`` lets the engine check it."""
    heads = sum(module.config.num_attention_heads for module in attentions)
    return {
        key: attention_layers_method(
            label, "language model attention", attentions, relevance, attention_heads=heads,
            contrast_runner_up=contrast, **options,
        )
        for key, label, contrast in (
            ("attention_contrast",
             "Gradient x attention to the image tokens, the word against the model's runner-up, language model layers",
             True),
            ("attention", "Gradient x attention to the image tokens, language model layers", False),
        )
    }  # fmt: skip


def cross_attention_methods(
    attentions: Sequence[nn.Module], relevance_for: Callable[[AttentionPooling], LayerRelevance]
) -> dict[str, Method]:
    """Gradient x cross-attention in a text decoder's layers (BLIP, Florence-2), one map per
    layer, then their mean: read through the softmax too ("cross_attention_softmax", the
    default: on the BLIP shapes demo it points at the word's own object more often than plain
    gradient x attention and deletes the word faster) and plain ("cross_attention").

    Args:
        attentions: the decoder's cross-attention modules, shallow to deep.
        relevance_for: an attention pooling (models.cam_methods) -> the family's relevance
            function, which knows where the patch keys and the word's rows are.
    """
    return {
        key: attention_layers_method(label, "decoder cross-attention", attentions, relevance_for(pooling))
        for key, label, pooling in (
            ("cross_attention_softmax",
             "Gradient x cross-attention, through the softmax too, text decoder layers",
             softmax_gradient_attention),
            ("cross_attention", "Gradient x cross-attention, text decoder layers", gradient_attention),
        )
    }  # fmt: skip


def projector_method(projector: nn.Module, relevance: LayerRelevance, **options) -> Method:
    """Gradient x input at the image-token embeddings the language model receives: the
    projector's (connector's, merger's) output, one map (no layers: it is the boundary between
    the two models). ``relevance`` gives one value per image token; ``token_of_patch`` (in
    ``options``) says which token each patch takes where that is not one token per patch."""
    return GradientMethod(
        "Gradient x input at the image tokens the language model reads (projector output)",
        (projector,),
        ("projector output",),
        relevance,
        **options,
    )


def _word_row_attention(
    attention, gradients, caption, word_indices, pooling: AttentionPooling = gradient_attention
) -> torch.Tensor:
    """(words, keys): ``pooling`` of gradient and attention from the rows that predict each word
    (row t - 1 predicts id t), summed over the word's pieces; it averages over heads.
    ``attention`` (1, H, Q, K), ``gradients`` (W, 1, H, Q, K)."""
    maps = []
    for slot, index in enumerate(word_indices):
        word = caption.words[index]
        rows = slice(word.start - 1, word.end - 1)
        per_piece = pooling(
            attention[0, :, rows].transpose(0, 1), gradients[slot, 0, :, rows].transpose(0, 1)
        )  # (pieces, keys)
        maps.append(per_piece.sum(dim=0))
    return torch.stack(maps)


def attention_row_relevance(
    first_patch_key: int, patch_count: int | None = None, pooling: AttentionPooling = gradient_attention
) -> LayerRelevance:
    """Gradient x attention from each word's rows to the image's patch keys (cross-attention,
    whose keys are the vision tokens).

    Args:
        first_patch_key: keys before it are not patches (1 for a CLS token).
        patch_count: how many patch keys follow it; None: all the remaining keys (keys after
            the patches, Florence-2's prompt text, are none).
        pooling: (attention, gradients) of one row -> relevance per key; it sees all the keys,
            as the softmax does, before the patch keys are taken.
    """
    last_patch_key = None if patch_count is None else first_patch_key + patch_count

    def relevance(attention, gradients, caption, word_indices):
        word_keys = _word_row_attention(attention, gradients, caption, word_indices, pooling)
        return word_keys[:, first_patch_key:last_patch_key]

    return relevance


def image_token_attention_relevance(image_token_id: int, first_patch_token: int = 0) -> LayerRelevance:
    """Gradient x attention from each word's rows to the image-token columns of a decoder-only
    model's sequence (self-attention over text and image tokens alike). Returns (words, image
    tokens), in sequence order.

    Args:
        image_token_id: the id the processor writes once per image token.
        first_patch_token: image tokens before it are not patches (a CLS kept in the sequence).
    """

    def relevance(attention, gradients, caption, word_indices):
        columns = [position for position, token_id in enumerate(caption.token_ids) if token_id == image_token_id]
        columns = torch.tensor(columns[first_patch_token:], device=attention.device)
        return _word_row_attention(attention, gradients, caption, word_indices)[:, columns]

    return relevance


# Occlusion: blocks of patches keep a large grid near this many forward passes per side.
OCCLUSION_MAX_BLOCKS_PER_SIDE = 12
OCCLUSION_BATCH = 16


def occlusion_blocks(geometry: ImageGeometry) -> list[list[int]]:
    """Patch ids grouped into square blocks, view by view, so that no view needs more than
    OCCLUSION_MAX_BLOCKS_PER_SIDE blocks per side."""
    blocks, first = [], 0
    for view in geometry.views:
        rows, columns = view.grid_shape
        side = max(1, math.ceil(max(rows, columns) / OCCLUSION_MAX_BLOCKS_PER_SIDE))
        for top in range(0, rows, side):
            for left in range(0, columns, side):
                blocks.append([
                    first + row * columns + column
                    for row in range(top, min(top + side, rows))
                    for column in range(left, min(left + side, columns))
                ])
        first += view.patch_count
    return blocks


class MissingCaptureError(RuntimeError):
    """A module a method reads returned nothing to capture during the forward pass (attention
    probabilities under SDPA, say: they need ``attn_implementation="eager"``)."""


class ExplanationTooLargeError(MemoryError):
    """An explanation would need more memory than the machine has free (checked before it runs:
    running out would end the process that serves every session)."""


# What one word's gradient x attention keeps per head and pair of positions: the probabilities
# (saved for the backward pass), the scores the eager softmax reads, and their gradient.
ATTENTION_COPIES = 3


def check_attention_memory(method: GradientMethod, sequence_length: int, dtype: torch.dtype) -> None:
    """Refuse a method that reads whole-sequence self-attention when its attention maps alone
    would not fit in the free memory (a lower bound of what it needs).

    Raises:
        ExplanationTooLargeError: with what it needs, what is free and what to do instead.
    """
    needed = ATTENTION_COPIES * method.attention_heads * sequence_length**2 * dtype.itemsize
    free = available_memory_bytes()
    if method.attention_heads and free is not None and needed > free:
        raise ExplanationTooLargeError(
            f"{method.label} over this image's {sequence_length} tokens would hold about "
            f"{needed / 2**30:.1f} GB of attention maps, and this machine has {free / 2**30:.1f} GB free. "
            "Choose another method (the vision-layer methods need far less), a smaller image, or bfloat16."
        )


def switch_to_eager_attention(model: nn.Module, config_names: Sequence[str]) -> None:
    """Switch the named sub-models (``"text_config"``, ...) to eager attention, which returns
    attention probabilities (SDPA returns none); the model is then the explainer's.

    Raises:
        MissingCaptureError: a sub-model did not switch.
    """
    model.set_attn_implementation(dict.fromkeys(config_names, "eager"))
    for name in config_names:
        implementation = getattr(model.config, name)._attn_implementation
        if implementation != "eager":
            raise MissingCaptureError(
                f"the {name.removesuffix('_config')} model uses {implementation!r} attention, "
                "which returns no attention probabilities; eager attention is needed"
            )


def special_token_ids(tokenizer, text_config, *extra_ids: int) -> frozenset[int]:
    """Ids that are never words: the tokenizer's special ids, the text config's BOS, EOS,
    padding and decoder-start ids (each an id, a list of ids, or unset), and ``extra_ids``
    (image tokens)."""
    names = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    configured = (getattr(text_config, name, None) for name in names)
    return frozenset(tokenizer.all_special_ids) | set(extra_ids) | {
        token_id
        for value in configured
        for token_id in (value if isinstance(value, (list, tuple)) else [value])
        if isinstance(token_id, int)
    }


# Chat models caption by answering an instruction; the page's prompt box replaces it.
DEFAULT_INSTRUCTION = "Describe this image in one sentence."
INSTRUCTION_LABEL = "Instruction"
INSTRUCTION_HELP = f"What the model is asked about the image; empty: “{DEFAULT_INSTRUCTION}”"


class PromptTooLongError(ValueError):
    """The prompt fills the model's token positions, leaving no room for a caption."""


class CaptionerExplainer(PretrainedExplainer):
    """Captions an image and explains each caption word with heatmaps; one subclass per family.

    One instance serves many threads at once: it holds no per-call state, and activations are
    captured per call by hooks that see only their own thread's forward passes. Gradients are
    taken with ``torch.autograd.grad`` with respect to activations, so nothing is ever written
    to the shared parameters' ``.grad``.

    Args:
        model: the family's model, frozen, in eval mode.
        processor: its processor (image processor and tokenizer).
        device: where the model lives.
        flush_denormals: flush denormal floats to zero in the computing threads (see
            models.denormals); False only to measure what that saves.
    """

    # What a family declares, besides PretrainedExplainer's model and processor classes.
    model_types: ClassVar[tuple[str, ...]]  # the ``config.model_type`` values it explains
    role: ClassVar[str] = "captioner"  # how loading messages call what it is for
    default_method: ClassVar[str]
    # The sidebar's text box: what the family's ``caption(prompt=...)`` does with it.
    prompt_label: ClassVar[str] = "Prompt"
    prompt_help: ClassVar[str] = ""
    # Families whose prompt is one of a few tasks (Florence-2) list them, the default first:
    # the page offers a select box instead of the text box.
    prompt_choices: ClassVar[tuple[str, ...]] = ()
    # Chat families: a caption's text is the answer alone; the template and the instruction
    # are what the model was asked, not what it wrote (the page shows the text, CLIP reads it).
    # Captioners whose prompt starts the caption (BLIP) keep it in the text.
    text_is_answer_only: ClassVar[bool] = False
    patch_size: int  # side of one patch in model pixels, read from the config by the family
    special_ids: frozenset[int]  # ids that are never words (BOS, EOS, padding, image tokens ...)

    def __init__(self, model: nn.Module, processor, device: torch.device | None = None, flush_denormals: bool = True):
        self.model = model
        self.processor = processor
        self.device = device or next(model.parameters()).device
        self.flush_denormals = flush_denormals
        self.methods: dict[str, Method] = self.build_methods()

    # ------------------------------------------------------------ what a family provides

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """Where the patches the model sees lie on an image of (width, height), in the order of
        the maps' patches (see utils.patch_utils)."""
        raise NotImplementedError

    def build_methods(self) -> dict[str, Method]:
        """The explanation methods this family supports, keyed by name, in menu order."""
        raise NotImplementedError

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The image processor's (batch, 3, height, width) output, on the device in the model's
        dtype. This default and the next two serve families whose image is one such tensor read
        as ``pixel_values`` (BLIP, LLaVA-1.5); tiled or flattened families override them."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt").pixel_values
        return pixels.to(self.device, self.model.dtype)

    def model_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """The processor's image inputs for a batch of RGB images, on the device."""
        return {"pixel_values": self.pixel_values(images)}

    def teacher_forced_logits(
        self, inputs: dict[str, torch.Tensor], ids: torch.Tensor, first_row: int = 0
    ) -> torch.Tensor:
        """(batch, ids - first_row, vocabulary) logits of one forward pass over the given ids, as
        they are, at the positions from ``first_row`` on (chat families ask the model for those
        alone: ``logits_to_keep``)."""
        return self.model(pixel_values=inputs["pixel_values"], input_ids=ids).logits[:, first_row:]

    def caption(self, image: Image.Image, prompt: str = "", max_new_tokens: int = 30, num_beams: int = 1) -> Caption:
        """Generate a caption (greedy when ``num_beams`` is 1), optionally continuing ``prompt``,
        with at most ``new_token_budget`` new ids."""
        raise NotImplementedError

    @property
    def max_caption_tokens(self) -> int:
        """Most ids a caption may hold, BOS and prompt included: the text model's position limit
        (generation would index past it; 32 on the BLIP demo, 512 on BLIP base)."""
        return self.model.config.text_config.max_position_embeddings

    def vision_tower_layers(self) -> Sequence[nn.Module]:
        """The vision encoder's layers, shallow to deep (the sanity check re-randomises the top ones)."""
        raise NotImplementedError

    def occluded_inputs(self, inputs: dict[str, torch.Tensor], blocks: Sequence[Sequence[int]]) -> dict:
        """The inputs repeated once per block of patch ids, each with its block's pixels set to
        the normalised dataset mean (zero). This default serves a (1, 3, H, W) ``pixel_values``
        seen as one grid; families whose pixels are tiled or flattened override it."""
        height, width = inputs["pixel_values"].shape[-2:]
        # The model's input as one patch grid, so its boxes (in model pixels) come from the one
        # function that turns a patch id into a box.
        model_grid = squash_geometry((width, height), (height // self.patch_size, width // self.patch_size))
        occluded = inputs["pixel_values"].repeat(len(blocks), 1, 1, 1)
        for slot, block in enumerate(blocks):
            for patch_id in block:
                box = model_grid.patch_box_image(patch_id)
                occluded[slot, :, box.y0 : box.y1, box.x0 : box.x1] = 0
        return {**inputs, "pixel_values": occluded}

    # ------------------------------------------------------------ shared by every family

    def typed_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """``model_inputs`` with floating-point tensors in the model's dtype (a bfloat16 model
        reads bfloat16 pixels); log p is computed in float32 whatever the model's dtype."""
        return {
            name: value.to(self.model.dtype) if value.is_floating_point() else value
            for name, value in self.model_inputs(images).items()
        }

    def new_token_budget(self, prompt_length: int, max_new_tokens: int) -> int:
        """How many ids a caption may add after ``prompt_length`` ids: at most ``max_new_tokens``,
        fewer when the prompt leaves less room under ``max_caption_tokens``.

        Raises:
            PromptTooLongError: the prompt leaves no room for a single new id.
        """
        room = self.max_caption_tokens - prompt_length
        if room < 1:
            raise PromptTooLongError(
                f"The prompt takes {prompt_length} of the model's {self.max_caption_tokens} token positions, "
                "leaving none for the caption. Shorten the prompt."
            )
        return min(max_new_tokens, room)

    def caption_from_ids(self, token_ids: Sequence[int], prompt_length: int = 1) -> Caption:
        """A Caption (pieces, whole words, text without special ids) from the ids the
        explanation's forward pass reads; the first ``prompt_length`` ids (BOS alone by
        default) are never words."""
        tokenizer = self.processor.tokenizer
        token_ids = tuple(int(token_id) for token_id in token_ids)
        pieces = tuple(tokenizer.convert_ids_to_tokens(list(token_ids)))
        words = caption_words(tokenizer, token_ids, prompt_length, self.special_ids)
        written = token_ids[prompt_length:] if self.text_is_answer_only else token_ids
        text = tokenizer.decode([token_id for token_id in written if token_id not in self.special_ids]).strip()
        return Caption(text, token_ids, pieces, words, prompt_length)

    def method_label(self, method: str) -> str:
        return self._method(method).label

    def layer_names(self, method: str) -> tuple[str, ...]:
        """Labels of the maps a method returns, shallow to deep."""
        return self._method(method).map_names

    def default_layer(self, method: str) -> int:
        """Index of the map shown first: the last one (the deepest layer, or the mean over
        layers where a method pools them, which pointed best on the shapes benchmark)."""
        return len(self.layer_names(method)) - 1

    def _method(self, method: str) -> Method:
        if method not in self.methods:
            raise ValueError(f"unknown method {method!r}; choose one of {tuple(self.methods)}")
        return self.methods[method]

    @in_denormal_mode
    @torch.no_grad()
    def token_log_probs(self, images: Sequence[Image.Image], token_ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced log p of every id given each image, in one batched forward pass.

        Returns:
            (images, ids) float32; column 0 (never predicted) is NaN.
        """
        ids = torch.tensor([list(token_ids)], device=self.device).expand(len(images), -1)
        logits = self.teacher_forced_logits(self.typed_inputs(images), ids).float()  # (B, T, V)
        log_probs = logits[:, :-1].log_softmax(dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        nan_column = torch.full((len(images), 1), math.nan, device=self.device)
        return torch.cat([nan_column, log_probs], dim=1).float().cpu().numpy()

    def word_target(
        self, caption: Caption, word_index: int, piece: int | None = None, foil_id: int | None = None
    ) -> Target:
        """The target for one caption word.

        Args:
            caption: the caption the word belongs to.
            word_index: index into ``caption.words``.
            piece: explain only this piece of the word (0-based); None for all its pieces.
            foil_id: a contrasting vocabulary id; the target becomes log p(word) - log p(foil)
                at the word's first piece (or ``piece``: ``contrast_position``).
        """
        if foil_id is not None:
            return contrastive_target(caption.token_ids, contrast_position(caption, word_index, piece), foil_id)
        word = caption.words[word_index]
        positions = list(range(word.start, word.end))
        return token_log_prob_target(caption.token_ids, positions if piece is None else [positions[piece]])

    def word_targets(
        self, caption: Caption, word_indices: Sequence[int], piece: int | None, foil_ids: Sequence[int | None]
    ) -> list[Target]:
        """``word_target`` of each word with its foil id."""
        return [
            self.word_target(caption, index, piece, foil_id)
            for index, foil_id in zip(word_indices, foil_ids, strict=True)
        ]

    def foil_token_id(self, caption: Caption, position: int, foil: str) -> int:
        """The vocabulary id of a contrasting word, spelled as the caption's piece at
        ``position`` is: byte-level BPE has " red" ("Ġred") and "red" as two pieces, and a word
        after a space is the first. Raises ValueError unless the foil is a single piece."""
        tokenizer = self.processor.tokenizer
        leading_space = tokenizer.decode([caption.token_ids[position]])[:1].isspace()
        foil_ids = tokenizer((" " if leading_space else "") + foil.strip(), add_special_tokens=False).input_ids
        if len(foil_ids) != 1:
            raise ValueError(f"the foil {foil!r} is not a single word piece of this model's vocabulary")
        return foil_ids[0]

    def runner_up_id(self, log_probs: torch.Tensor, caption: Caption, position: int, first_row: int) -> int:
        """The id the model rates most probable at ``position`` other than the caption's own,
        never a special id, from the teacher-forced ``log_probs`` (rows from ``first_row`` on,
        vocabulary) of one image."""
        row = log_probs[position - 1 - first_row].detach().clone()
        # Ids the tokenizer added beyond the output layer's rows can never be predicted anyway.
        never = [token_id for token_id in self.special_ids if token_id < row.numel()]
        row[torch.tensor(never, dtype=torch.long, device=row.device)] = -math.inf
        row[caption.token_ids[position]] = -math.inf
        return int(row.argmax())

    def foil_ids(
        self, method: Method, caption: Caption, word_indices: Sequence[int], piece: int | None, foil: str | None
    ) -> list[int | None]:
        """Each word's contrasting id: the given foil's, else RUNNER_UP where the method contrasts
        with the model's runner-up (found in the gradient pass's own forward), else None (log p)."""
        if foil is not None:
            positions = [contrast_position(caption, index, piece) for index in word_indices]
            return [self.foil_token_id(caption, position, foil) for position in positions]
        if isinstance(method, GradientMethod) and method.contrast_runner_up:
            return [RUNNER_UP] * len(word_indices)
        return [None] * len(word_indices)

    @in_denormal_mode
    def explain(
        self,
        image: Image.Image,
        caption: Caption,
        word_indices: Sequence[int] | None = None,
        method: str | None = None,
        piece: int | None = None,
        foil: str | None = None,
    ) -> list[WordMaps]:
        """Heatmaps of caption words for every layer, all words sharing one forward pass.

        Args:
            image: RGB image the caption was generated for.
            caption: from ``caption()``.
            word_indices: which of ``caption.words``; None explains them all.
            method: a key of ``methods``; None for the family's default.
            piece: see ``word_target``.
            foil: a word to contrast with (one piece of the vocabulary): the target becomes
                log p(word) - log p(foil) at the word's first piece (or ``piece``). None: the
                method's own target (the word's log p, or against the runner-up).
        Returns:
            One WordMaps per requested word, in order.
        """
        method = method or self.default_method
        chosen = self._method(method)
        indices = range(len(caption.words)) if word_indices is None else list(word_indices)
        if not indices:
            return []
        inputs = self.typed_inputs([image])
        foil_ids = self.foil_ids(chosen, caption, indices, piece, foil)
        ids = torch.tensor([caption.token_ids], device=self.device)
        if isinstance(chosen, OcclusionMethod):
            targets = self.word_targets(caption, indices, piece, foil_ids)
            blocks = occlusion_blocks(self.image_geometry(image.size))
            scores, cam_patches = self._occlusion_maps(inputs, ids, targets, blocks, caption.prompt_length - 1)
        else:
            check_attention_memory(chosen, ids.shape[1], next(self.model.parameters()).dtype)
            scores, cam_patches, foil_ids = self._gradient_maps(chosen, inputs, ids, caption, indices, piece, foil_ids)
        cam_patches = cam_patches.float().cpu().numpy()  # (W, maps, patches)
        tokenizer = self.processor.tokenizer
        return [
            WordMaps(
                caption.words[index].text, method, chosen.map_names, cam_patches[slot], float(scores[slot]),
                None if foil_id is None else tokenizer.decode([foil_id]).strip(),
            )
            for slot, (index, foil_id) in enumerate(zip(indices, foil_ids, strict=True))
        ]

    def _gradient_maps(
        self,
        method: GradientMethod,
        inputs: dict[str, torch.Tensor],
        ids: torch.Tensor,
        caption: Caption,
        word_indices: Sequence[int],
        piece: int | None,
        foil_ids: Sequence[int | None],
    ) -> tuple[torch.Tensor, torch.Tensor, list[int | None]]:
        """Scores (words,), maps (words, maps, patches) and each word's foil id (RUNNER_UP
        resolved): one forward pass shared by all words, then one gradient call per word for
        every layer."""
        # Frozen parameters: without an input that requires grad nothing would be differentiable.
        inputs = {
            name: value.detach().requires_grad_(True) if value.is_floating_point() else value
            for name, value in inputs.items()
        }
        with (
            torch.enable_grad(),
            capture_outputs(method.modules, output_index=method.output_index) as captured,
        ):
            # Rows from the one before the caption's first word: no target reads the prompt's.
            first_row = caption.prompt_length - 1
            log_probs = self.teacher_forced_logits(inputs, ids, first_row)[0].float().log_softmax(dim=-1)
            module_names = method.layer_names if method.compose is None else [type(m).__name__ for m in method.modules]
            missing = [name for name, value in zip(module_names, captured, strict=True) if value is None]
            if missing:
                raise MissingCaptureError(
                    f"{method.label}: nothing was captured at {', '.join(missing)} "
                    "(attention probabilities need attn_implementation='eager')"
                )
            # The runner-up is read off this same pass: no second forward for the default target.
            foil_ids = [
                self.runner_up_id(log_probs, caption, contrast_position(caption, index, piece), first_row)
                if foil_id == RUNNER_UP else foil_id
                for index, foil_id in zip(word_indices, foil_ids, strict=True)
            ]  # fmt: skip
            targets = self.word_targets(caption, word_indices, piece, foil_ids)
            scores = torch.stack([target(log_probs, first_row) for target in targets])  # (W,)
            # One backward pass per word over the one shared forward graph. (Batching them with
            # is_grads_batched=True, i.e. vmap, measured 50% slower on CPU for BLIP base.) Each
            # word's gradients become its maps at once: kept for every word, the gradients of
            # every layer's attention would hold words x layers x heads x T^2 floats (tens of GB
            # for a 0.5 B chat model's 1500-token sequence).
            per_word = []
            for slot, score in enumerate(scores):
                gradients = torch.autograd.grad(score, captured, retain_graph=slot < len(targets) - 1)
                with torch.no_grad():
                    per_word.append(self._word_maps(method, captured, gradients, caption, word_indices[slot]))
                del gradients
        maps = [torch.stack(layer_maps) for layer_maps in zip(*per_word, strict=True)]  # per layer: (W, patches)
        if method.token_of_patch is not None:
            index = method.token_of_patch(inputs)
            maps = [layer_map[:, index] for layer_map in maps]
        if method.pooled_name:
            # A mean rather than a sum keeps the pooled map on the layers' scale, so a colour
            # scale shared with the single layers still shows them.
            maps.append(torch.stack(maps).mean(dim=0))
        return scores.detach(), torch.stack(maps, dim=1).detach(), foil_ids

    @staticmethod
    def _word_maps(method: GradientMethod, captured, gradients, caption: Caption, word_index: int) -> list:
        """One word's maps, a (patches,) tensor per map before pooling, from its gradients
        (1, ...) with respect to every captured module."""
        gradients = [gradient[None] for gradient in gradients]  # (1 word, 1, ...)
        if method.compose is not None:
            return [word_map[0] for word_map in method.compose(captured, gradients, caption, [word_index])]
        return [
            method.relevance(activation, gradient, caption, [word_index])[0]
            for activation, gradient in zip(captured, gradients, strict=True)
        ]

    @torch.no_grad()
    def _occlusion_maps(
        self,
        inputs: dict[str, torch.Tensor],
        ids: torch.Tensor,
        targets: Sequence[Target],
        blocks: Sequence[Sequence[int]],
        first_row: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (words,) and maps (words, 1, patches): the drop of each target when a block of
        patches is occluded, in batched forward passes; every patch of a block gets its drop.
        Only the logits' rows from ``first_row`` on are computed (see ``Target``)."""

        def scores_of(batch_inputs: dict[str, torch.Tensor], batch: int) -> torch.Tensor:  # -> (B, W)
            logits = self.teacher_forced_logits(batch_inputs, ids.expand(batch, -1), first_row)
            log_probs = logits.float().log_softmax(dim=-1)
            return torch.stack([target(log_probs, first_row) for target in targets], dim=-1)

        base_scores = scores_of(inputs, 1)[0]  # (W,)
        cam = torch.zeros(len(targets), sum(len(block) for block in blocks), device=self.device)
        for first in range(0, len(blocks), OCCLUSION_BATCH):
            chunk = blocks[first : first + OCCLUSION_BATCH]
            drops = torch.relu(base_scores - scores_of(self.occluded_inputs(inputs, chunk), len(chunk)))  # (B, W)
            for slot, block in enumerate(chunk):
                cam[:, list(block)] = drops[slot, :, None]
        return base_scores, cam[:, None]

    def randomised_copy(self, top_layers: int, seed: int) -> Self:
        """This explainer on a deep copy of its model whose top vision layers have random weights.

        Cascading model randomisation (Adebayo et al., 2018). Each parameter of the top
        ``top_layers`` vision layers is redrawn from a normal with the trained tensor's mean and
        spread, so activations keep their scale but lose what was learnt. The shared model is
        never touched.
        """
        randomised = type(self)(copy.deepcopy(self.model), self.processor, self.device, self.flush_denormals)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in randomised.vision_tower_layers()[-top_layers:]:
                for parameter in layer.parameters():
                    noise = torch.randn(parameter.shape, generator=generator).to(parameter.device)
                    parameter.copy_(parameter.mean() + parameter.std(correction=0) * noise)
        return randomised
