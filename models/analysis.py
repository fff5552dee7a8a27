"""What the app asks of the explainers, as plain results: the causal mask-and-regenerate test.

The app only lays these results out; everything that touches a model lives here or in the
explainers, so it can be tested without a browser.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.explainer import Caption, CaptionerExplainer, Decoding, WordMaps
from utils.caption_diff import DiffToken, removed_words, word_diff
from utils.image_utils import COUNTERFACTUALS, counterfactual_images
from utils.metrics import (
    CaptionWords,
    CurveSet,
    LayerRanking,
    RemovalRegion,
    SanityCheck,
    ScoreImages,
    compare_maps,
    find_removal_region,
    measure_curves,
    rank_layers,
)
from utils.patch_utils import Box, Colour, FillMode, mask_boxes


@dataclass(frozen=True)
class WorkKey:
    """Names the inputs of cached model work: the model (source and device), the image (the
    sha256 of its bytes: Streamlit's own hashing samples large data) and the caption's ids.

    Defined here, not in app.py: Streamlit executes the script anew on every rerun, and keys
    kept in session state must compare equal across runs (a class defined in the script would
    be a new class each time).
    """

    model: str
    image: str
    caption: str = ""


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


def caption_image(captioner: CaptionerExplainer, image: Image.Image, decoding: Decoding) -> Caption:
    """Caption an image with the given decoding options."""
    return captioner.caption(image, decoding.prompt, decoding.max_new_tokens, decoding.num_beams)


def word_log_probs(captioner: CaptionerExplainer, images: Sequence[Image.Image], caption: Caption) -> np.ndarray:
    """(images, words) teacher-forced log p of each caption word (its pieces summed) per image."""
    token_log_probs = captioner.token_log_probs(images, caption.token_ids)
    return np.stack([token_log_probs[:, word.start : word.end].sum(axis=1) for word in caption.words], axis=1)


# Below this many nats, the image raised a word's log p too little for its heatmap to be
# evidence: p(word | image) is under 1.65 x p(word | images that show nothing of it).
LANGUAGE_PRIOR_NATS = 0.5


@dataclass(frozen=True)
class WordEvidence:
    """How much each caption word owes to the image (EAGLE's modality reliance, per word).

    Args:
        probabilities: (words,) p(word | image), its pieces' product, teacher-forced.
        reliance: (words,) log p(word | image) - log p(word | counterfactual), in nats, both on
            the same caption prefix (p(word | counterfactual): the mean over its images); near
            zero or below, the word comes from the language prior.
        counterfactual: which images stood for "no image" (utils.image_utils.COUNTERFACTUALS).
    """

    probabilities: np.ndarray
    reliance: np.ndarray
    counterfactual: str

    @property
    def from_prior(self) -> np.ndarray:
        """(words,) True where the image raised the word's log p by less than LANGUAGE_PRIOR_NATS."""
        return self.reliance < LANGUAGE_PRIOR_NATS


def word_evidence(
    captioner: CaptionerExplainer, image: Image.Image, caption: Caption, counterfactual: str = COUNTERFACTUALS[0]
) -> WordEvidence:
    """Every word's probability and visual reliance, from one batched teacher-forced pass over
    the image and its counterfactual."""
    (evidence,) = word_evidence_against(captioner, image, caption, [counterfactual])
    return evidence


def word_evidence_against(
    captioner: CaptionerExplainer, image: Image.Image, caption: Caption, counterfactuals: Sequence[str]
) -> list[WordEvidence]:
    """``word_evidence`` for each counterfactual, from one batched pass over the image and all of
    their images; a counterfactual of several images counts each word's mean probability."""
    mean_rgb = getattr(captioner.processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    blanks = [counterfactual_images(image, kind, mean_rgb) for kind in counterfactuals]
    log_probs = word_log_probs(captioner, [image, *itertools.chain.from_iterable(blanks)], caption)
    # Rows: the image's, then each counterfactual's images in turn.
    (with_image,), *without = np.split(log_probs, np.cumsum([1, *(len(images) for images in blanks)])[:-1])
    return [
        WordEvidence(np.exp(with_image), with_image - mean_log_prob(other), kind)
        for kind, other in zip(counterfactuals, without, strict=True)
    ]


def mean_log_prob(log_probs: np.ndarray) -> np.ndarray:
    """(images, words) log p -> (words,) the log of each word's probability averaged over the images."""
    return np.logaddexp.reduce(log_probs, axis=0) - math.log(len(log_probs))


def mask_and_recaption(
    captioner: CaptionerExplainer,
    image: Image.Image,
    caption: Caption,
    boxes_image: Sequence[Box],
    fill: FillMode | tuple[int, int, int],
    decoding: Decoding,
) -> MaskedCaption:
    """Mask the boxes, caption the result again and measure what changed."""
    masked_image = mask_boxes(image, boxes_image, fill)
    mask_image = mask_boxes(Image.new("RGB", image.size), boxes_image, (255, 255, 255)).convert("L")
    new_caption = caption_image(captioner, masked_image, decoding)
    before = [word.text for word in caption.words]
    after = [word.text for word in new_caption.words]
    log_probs = word_log_probs(captioner, [image, masked_image], caption)
    return MaskedCaption(
        masked_image=masked_image,
        mask_image=mask_image,
        caption=new_caption,
        diff=word_diff(before, after),
        removed=removed_words(before, after),
        log_prob_change=log_probs[1] - log_probs[0],
    )


def word_scorer(captioner: CaptionerExplainer, caption: Caption, word_indices: Sequence[int]) -> ScoreImages:
    """Score function for metrics: images -> (images, words) teacher-forced log p of the given words."""
    indices = list(word_indices)
    return lambda images: word_log_probs(captioner, images, caption)[:, indices]


def caption_word_reader(captioner: CaptionerExplainer, decoding: Decoding = Decoding()) -> CaptionWords:
    """Function for metrics: image -> the words of its new caption."""
    return lambda image: [word.text for word in caption_image(captioner, image, decoding).words]


@dataclass(frozen=True)
class WordFaithfulness:
    """How faithful one word's heatmap is: curves, the best layer, the smallest removing region."""

    curves: CurveSet
    layers: LayerRanking
    removal: RemovalRegion


def measure_word(
    captioner: CaptionerExplainer,
    image: Image.Image,
    caption: Caption,
    word_index: int,
    maps: WordMaps,
    layer: int,
    fill: FillMode | Colour,
    decoding: Decoding,
    steps: int = 16,
) -> WordFaithfulness:
    """Deletion/insertion curves of one layer's map, deletion AUC of every layer, minimal region.

    Masked images are scored in batches (one forward pass per chunk), not one pass per step.
    """
    one_word = word_scorer(captioner, caption, [word_index])

    def score(images: list[Image.Image]) -> np.ndarray:  # (images,): one target keeps AUCs scalar
        return one_word(images)[:, 0]

    geometry = captioner.image_geometry(image.size)
    return WordFaithfulness(
        curves=measure_curves(image, geometry, maps.cam_patches[layer], score, fill=fill, steps=steps),
        layers=rank_layers(image, geometry, maps.cam_patches, score, maps.layer_names, fill=fill, steps=steps),
        removal=find_removal_region(
            image, geometry, maps.cam_patches[layer], maps.word, caption_word_reader(captioner, decoding), fill=fill
        ),
    )


def sanity_check(
    captioner: CaptionerExplainer, image: Image.Image, caption: Caption, word_index: int, method: str, layer: int,
    top_layers: int = 2, seed: int = 0,
) -> SanityCheck:
    """Rank correlation of a word's map before and after re-randomising the top vision layers."""
    (before,) = captioner.explain(image, caption, [word_index], method)
    (after,) = captioner.randomised_copy(top_layers, seed).explain(image, caption, [word_index], method)
    return compare_maps(before.cam_patches[layer], after.cam_patches[layer])
