"""Which explainer family a captioning checkpoint belongs to, read from its config.json.

One table maps ``config.model_type`` to the family that explains it, as transformers'
``auto`` classes do; the page, ``evaluate.py`` and the benchmarks load captioners through
``load_captioner`` and never name a family's class. Adding a family = one file in models/ and
one entry here.
"""

from __future__ import annotations

import torch
from torch import nn

from models.blip2_explainer import Blip2Explainer
from models.blip_explainer import BlipExplainer
from models.explainer import CaptionerExplainer
from models.florence2_explainer import Florence2Explainer
from models.llava_explainer import LlavaExplainer
from models.llava_onevision_explainer import LlavaOnevisionExplainer
from models.loading import (
    ModelUnavailableError,
    ProgressCallback,
    check_model_type,
    explainer_from_folder,
    pick_device,
    resolve_model_dir,
    source_name,
)
from models.qwen2vl_explainer import Qwen2_5_VLExplainer, Qwen2VLExplainer, Qwen3VLExplainer
from models.smolvlm_explainer import Idefics3Explainer, SmolVLMExplainer

CAPTIONER_FAMILIES: tuple[type[CaptionerExplainer], ...] = (
    BlipExplainer,
    LlavaExplainer,
    LlavaOnevisionExplainer,
    SmolVLMExplainer,
    Idefics3Explainer,
    Qwen2VLExplainer,
    Qwen2_5_VLExplainer,
    Qwen3VLExplainer,
    Florence2Explainer,
    Blip2Explainer,
)
# The bundled demo folder that "shapes-demo" means for a captioner.
CAPTIONER_DEMO_COMPONENT = "blip"


def supported_model_types() -> tuple[str, ...]:
    return tuple(model_type for family in CAPTIONER_FAMILIES for model_type in family.model_types)


def captioner_family(model_type: str) -> type[CaptionerExplainer]:
    """The family that explains checkpoints of ``model_type``.

    Raises:
        ModelUnavailableError: no family explains it; the message lists those that do.
    """
    for family in CAPTIONER_FAMILIES:
        if model_type in family.model_types:
            return family
    raise ModelUnavailableError(
        f"Models of type {model_type or 'unknown'!r} are not supported as captioners; "
        f"supported types: {', '.join(supported_model_types())}."
    )


def load_captioner(
    source: str, device: str = "auto", on_progress: ProgressCallback | None = None, precision: str = "float32"
) -> CaptionerExplainer:
    """The explainer for the captioner that ``source`` names ("shapes-demo", a folder or a hub
    id), of the family its config.json declares, in ``precision`` (a key of loading.PRECISIONS).

    Raises:
        ModelUnavailableError: the source cannot be resolved (see ``resolve_model_dir``), holds
            a model of a type no family explains (a CLIP folder, say: the message names the
            folder and its model type), or its weights do not load or do not fit.
    """
    folder = resolve_model_dir(source, CAPTIONER_DEMO_COMPONENT, on_progress)
    name = source_name(source, CAPTIONER_DEMO_COMPONENT)
    # From config.json alone, before any weights: a CLIP folder is named as one, not as a misfit.
    model_type = check_model_type(folder, name, supported_model_types(), CaptionerExplainer.role)
    return explainer_from_folder(captioner_family(model_type), folder, pick_device(device), name, precision)


def explainer_for_model(
    model: nn.Module, processor, device: torch.device | None = None, flush_denormals: bool = True
) -> CaptionerExplainer:
    """The explainer of the family that ``model.config.model_type`` names, on a model already
    built (a benchmark's random-weight architecture, a test's tiny model)."""
    return captioner_family(model.config.model_type)(model, processor, device, flush_denormals)
