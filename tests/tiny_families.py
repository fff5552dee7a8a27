"""A tiny checkpoint folder of each chat family, as a server-side folder would hold it."""

from __future__ import annotations

from pathlib import Path

from tests.tiny_llava import build_tiny_llava
from tests.tiny_llava_onevision import build_tiny_llava_onevision, save_tiny_llava_onevision
from tests.tiny_models import save_tiny
from tests.tiny_qwen2vl import build_tiny_qwen2vl, save_tiny_qwen2vl
from tests.tiny_smolvlm import save_tiny_smolvlm

CHAT_FAMILIES = ("llava", "llava_onevision", "smolvlm", "idefics3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def save_family(family: str, folder: Path) -> Path:
    """Save a tiny random model of ``family`` (a config ``model_type``) to ``folder``."""
    if family == "llava":
        return save_tiny(*build_tiny_llava(), folder)
    if family == "llava_onevision":
        # Seed 1: its random answers about the test scenes hold words of letters, which evaluate.py measures.
        return save_tiny_llava_onevision(*build_tiny_llava_onevision(seed=1), folder)
    if family.startswith("qwen"):
        return save_tiny_qwen2vl(*build_tiny_qwen2vl(model_type=family), folder)
    return save_tiny_smolvlm(folder, model_type=family)
