"""What the app asks of the explainers, as plain results: the causal mask-and-regenerate test.

The app only lays these results out; everything that touches a model lives here or in the
explainers, so it can be tested without a browser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.blip_explainer import BlipExplainer, Caption
from utils.caption_diff import DiffToken, removed_words, word_diff
from utils.patch_utils import Box, FillMode, mask_boxes


@dataclass(frozen=True)
class Decoding:
    """How captions are generated: optional prompt, length limit, beam width (1 = greedy)."""

    prompt: str = ""
    max_new_tokens: int = 30
    num_beams: int = 1


@dataclass(frozen=True)
class MaskedCaption:
    """The causal test: the image with a region masked, captioned again.

    Args:
        masked_image: RGB original with the region filled.
        mask_image: "L" image, 255 where masked.
        caption: the new caption of the masked image.
        diff: word diff from the original caption to the new one.
        removed: original words missing from the new caption (a multiset difference).
        log_prob_change: (original words,) teacher-forced log p of each original word under
            the mask minus without it; negative means the region supported the word.
    """

    masked_image: Image.Image
    mask_image: Image.Image
    caption: Caption
    diff: list[DiffToken]
    removed: list[str]
    log_prob_change: np.ndarray


def caption_image(blip: BlipExplainer, image: Image.Image, decoding: Decoding) -> Caption:
    """Caption an image with the given decoding options."""
    return blip.caption(image, decoding.prompt, decoding.max_new_tokens, decoding.num_beams)


def word_log_probs(blip: BlipExplainer, images: Sequence[Image.Image], caption: Caption) -> np.ndarray:
    """(images, words) teacher-forced log p of each caption word (its pieces summed) per image."""
    token_log_probs = blip.token_log_probs(images, caption.token_ids)
    return np.stack([token_log_probs[:, word.start : word.end].sum(axis=1) for word in caption.words], axis=1)


def word_probabilities(blip: BlipExplainer, image: Image.Image, caption: Caption) -> np.ndarray:
    """(words,) probability of each caption word given the image (its pieces' product)."""
    return np.exp(word_log_probs(blip, [image], caption)[0])


def mask_and_recaption(
    blip: BlipExplainer,
    image: Image.Image,
    caption: Caption,
    boxes_image: Sequence[Box],
    fill: FillMode | tuple[int, int, int],
    decoding: Decoding,
) -> MaskedCaption:
    """Mask the boxes, caption the result again and measure what changed."""
    masked_image = mask_boxes(image, boxes_image, fill)
    mask_image = mask_boxes(Image.new("RGB", image.size), boxes_image, (255, 255, 255)).convert("L")
    new_caption = caption_image(blip, masked_image, decoding)
    before = [word.text for word in caption.words]
    after = [word.text for word in new_caption.words]
    log_probs = word_log_probs(blip, [image, masked_image], caption)
    return MaskedCaption(
        masked_image=masked_image,
        mask_image=mask_image,
        caption=new_caption,
        diff=word_diff(before, after),
        removed=removed_words(before, after),
        log_prob_change=log_probs[1] - log_probs[0],
    )
