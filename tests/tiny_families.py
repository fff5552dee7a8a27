"""A tiny checkpoint folder of each family, as a server-side folder would hold it."""

from __future__ import annotations

from pathlib import Path

from tests.tiny_blip2 import build_tiny_blip2
from tests.tiny_florence2 import build_tiny_florence2
from tests.tiny_llava import build_tiny_llava
from tests.tiny_llava_onevision import build_tiny_llava_onevision, save_tiny_llava_onevision
from tests.tiny_models import save_tiny
from tests.tiny_qwen2vl import build_tiny_qwen2vl, save_tiny_qwen2vl
from tests.tiny_smolvlm import save_tiny_smolvlm

CHAT_FAMILIES = ("llava", "llava_onevision", "smolvlm", "idefics3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# The chat families and the captioners whose prompt is a task (Florence-2) or a caption's start (BLIP-2).
TINY_FAMILIES = (*CHAT_FAMILIES, "florence2", "blip-2")


def save_family(family: str, folder: Path) -> Path:
    """Save a tiny random model of ``family`` (a config ``model_type``) to ``folder``."""
    if family == "llava":
        return save_tiny(*build_tiny_llava(), folder)
    if family == "florence2":
        return save_tiny(*build_tiny_florence2(), folder)
    if family == "blip-2":
        return save_tiny(*build_tiny_blip2(), folder)
    if family == "llava_onevision":
        # Seed 1: its random answers about the test scenes hold words of letters, which evaluate.py measures.
        return save_tiny_llava_onevision(*build_tiny_llava_onevision(seed=1), folder)
    if family.startswith("qwen"):
        return save_tiny_qwen2vl(*build_tiny_qwen2vl(model_type=family), folder)
    return save_tiny_smolvlm(folder, model_type=family)
