"""CLIP image-text alignment explained: similarity scores and Grad-CAM on a vision layer.

CLIP's image embedding is read from the last layer's CLS token alone, so the last layer's
patch tokens get exactly zero gradient: maps come from earlier layers, and asking for the
last one is an error rather than a silently blank map. The second-to-last layer's patch tokens
reach the embedding only through the last layer's first LayerNorm (as keys and values of the
CLS token's attention), and a LayerNorm's input gradient is orthogonal to its input, so
gradient x activation there sums to rounding noise: its map is read from that LayerNorm's
output instead, which is what the last layer actually attends to. CLIP resizes the short side
and centre-crops, so its map covers the crop only (see ``utils.patch_utils.centre_crop_geometry``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from models.cam_methods import VISION_LAYER_METHODS
from models.denormals import in_denormal_mode
from models.hooks import capture_outputs
from models.loading import PretrainedExplainer
from utils.patch_utils import ImageGeometry, centre_crop_geometry

CLIP_METHODS: tuple[str, ...] = ("gradcam", "hirescam")
DEFAULT_CLIP_METHOD = "gradcam"


@dataclass(frozen=True)
class Similarity:
    """CLIP's scores of one image against several texts.

    Args:
        texts: the texts, in order.
        cosine_x100: (texts,) cosine similarity x 100, as CLIP papers report it.
        probabilities: (texts,) softmax over the texts of the model's scaled logits.
    """

    texts: tuple[str, ...]
    cosine_x100: np.ndarray
    probabilities: np.ndarray


@dataclass(frozen=True)
class ClipMap:
    """Where in the image CLIP finds a text.

    Args:
        text: the explained text.
        method: key of CLIP_METHODS.
        layer: 0-based vision layer index.
        layer_name: its label.
        cam_patches: (patches,) float32 relevance of CLIP's patches (of the centre crop), >= 0.
        cosine_x100: the explained score.
    """

    text: str
    method: str
    layer: int
    layer_name: str
    cam_patches: np.ndarray
    cosine_x100: float


class ClipExplainer(PretrainedExplainer):
    """Scores and explains image-text similarity with CLIP; safe to share between threads.

    Args:
        model: a CLIPModel, frozen, in eval mode.
        processor: its CLIPProcessor.
        device: where the model lives.
        flush_denormals: flush denormal floats to zero in the computing thread (models.denormals).
    """

    model_class = CLIPModel
    processor_class = AutoProcessor
    model_types = ("clip",)
    role = "CLIP checker"
    demo_component = "clip"

    def __init__(
        self, model: CLIPModel, processor, device: torch.device | None = None, flush_denormals: bool = True
    ):
        self.model = model
        self.processor = processor
        self.device = device or next(model.parameters()).device
        self.flush_denormals = flush_denormals
        crop = processor.image_processor.crop_size
        self.crop_size = (crop["height"], crop["width"])
        self.patch_size = model.config.vision_config.patch_size
        self.vision_layers = list(model.vision_model.encoder.layers)
        # The last layer is excluded: its patch tokens never reach the embedding. The one
        # before it is read after the last layer's first LayerNorm (see the module docstring).
        self.cam_modules = [*self.vision_layers[:-2], self.vision_layers[-1].layer_norm1]
        self.cam_layers = tuple(range(len(self.cam_modules)))
        self.default_layer = self.cam_layers[-1]

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """Where CLIP's patches lie on an image of (width, height): its centre crop."""
        return centre_crop_geometry(image_size, self.crop_size, self.patch_size)

    def layer_name(self, layer: int) -> str:
        name = f"vision layer {layer + 1}/{len(self.vision_layers)}"
        if self.cam_modules[layer] in self.vision_layers:
            return name
        return f"{name}, normalised as the next layer reads it"

    def _pixel_values(self, image: Image.Image) -> torch.Tensor:
        pixels = self.processor.image_processor(images=[image], return_tensors="pt").pixel_values
        return pixels.to(self.device, self.model.dtype)

    @property
    def max_text_tokens(self) -> int:
        """Most tokens of a text CLIP reads (77 for B/32); the rest is cut off."""
        return self.model.config.text_config.max_position_embeddings

    def text_seen(self, text: str) -> str | None:
        """The part of ``text`` that CLIP reads, when it is cut; None when CLIP reads it all."""
        tokenizer = self.processor.tokenizer
        read = tokenizer(text, truncation=True, max_length=self.max_text_tokens).input_ids
        if len(tokenizer(text).input_ids) <= len(read):
            return None
        return tokenizer.decode(read, skip_special_tokens=True)

    @torch.no_grad()
    def _text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(texts, dim) unit-length text embeddings, each text cut to ``max_text_tokens``."""
        tokens = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        features = self.model.get_text_features(
            input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
        ).pooler_output
        return torch.nn.functional.normalize(features, dim=-1)

    def _image_embedding(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(1, dim) unit-length image embedding."""
        features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return torch.nn.functional.normalize(features, dim=-1)

    @in_denormal_mode
    @torch.no_grad()
    def similarity(self, image: Image.Image, texts: Sequence[str]) -> Similarity:
        """Cosine x 100 of the image with each text, and the softmax over the texts."""
        if not texts:
            raise ValueError("similarity needs at least one text")
        cosine = (self._image_embedding(self._pixel_values(image)) @ self._text_embeddings(texts).T)[0]
        probabilities = (self.model.logit_scale.exp() * cosine).softmax(dim=-1)
        return Similarity(tuple(texts), (100 * cosine).cpu().numpy(), probabilities.cpu().numpy())

    @in_denormal_mode
    def explain(
        self, image: Image.Image, text: str, layer: int | None = None, method: str = DEFAULT_CLIP_METHOD
    ) -> ClipMap:
        """Map of where the image supports ``text``: the gradient of the cosine similarity
        with respect to one vision layer's patch tokens.

        Args:
            image: RGB image.
            text: any sentence or word.
            layer: 0-based vision layer, one of ``cam_layers``; None for ``default_layer``.
            method: one of CLIP_METHODS.
        """
        layer = self.default_layer if layer is None else layer
        if layer not in self.cam_layers:
            raise ValueError(
                f"CLIP has no map at layer {layer + 1}: its image embedding reads only the last layer's "
                f"CLS token, so patch tokens there get zero gradient. Choose a layer from 1 to {len(self.cam_layers)}."
            )
        if method not in VISION_LAYER_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {CLIP_METHODS}")
        text_embedding = self._text_embeddings([text])  # (1, dim)
        pixel_values = self._pixel_values(image).requires_grad_(True)
        with torch.enable_grad(), capture_outputs([self.cam_modules[layer]]) as captured:
            cosine = (self._image_embedding(pixel_values) * text_embedding).sum()
            (gradient,) = torch.autograd.grad(cosine, captured)
        cosine = cosine.detach()
        activation = captured[0]
        cam_tokens = VISION_LAYER_METHODS[method](activation[0, 1:], gradient[0, 1:])  # drop CLS
        cam_patches = cam_tokens.detach().float().cpu().numpy()
        return ClipMap(text, method, layer, self.layer_name(layer), cam_patches, 100 * cosine.item())
