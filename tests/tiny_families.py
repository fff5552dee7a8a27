"""A tiny checkpoint folder of each chat family, as a server-side folder would hold it."""

from __future__ import annotations

from pathlib import Path

from tests.tiny_llava import build_tiny_llava
from tests.tiny_models import save_tiny
from tests.tiny_smolvlm import save_tiny_smolvlm

CHAT_FAMILIES = ("llava", "smolvlm", "idefics3")


def save_family(family: str, folder: Path) -> Path:
    """Save a tiny random model of ``family`` (a config ``model_type``) to ``folder``."""
    if family == "llava":
        return save_tiny(*build_tiny_llava(), folder)
    return save_tiny_smolvlm(folder, model_type=family)
