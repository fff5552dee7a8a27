"""Shared fixtures: tiny explainers loaded through the real from_pretrained path, offline."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

# Tests never reach a hub: the loading code must work from local folders alone.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The test models are tiny, and AppTest sessions run in threads: with two intra-op threads per
# forward pass the two cores are oversubscribed, which made the demo model up to 60x slower.
torch.set_num_threads(1)

from models.blip_explainer import BlipExplainer  # noqa: E402
from models.clip_explainer import ClipExplainer  # noqa: E402
from tests.tiny_models import build_tiny_blip, build_tiny_clip, save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory):
    return save_tiny(*build_tiny_blip(), tmp_path_factory.mktemp("tiny_blip"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny(*build_tiny_clip(), tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_blip(tiny_blip_dir) -> BlipExplainer:
    return BlipExplainer.from_pretrained(str(tiny_blip_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir) -> ClipExplainer:
    return ClipExplainer.from_pretrained(str(tiny_clip_dir), device="cpu")


def random_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A reproducible RGB noise image of (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)
