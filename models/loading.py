"""Where model weights come from: the bundled demo, a local folder, or the Hugging Face hub.

Every source ends up as a local folder that ``from_pretrained`` reads with safetensors only
and without remote code. A hub id is looked up in the local cache first; only when it is not
cached is the hub probed, with a short timeout, because transformers alone retries an
unreachable hub for minutes before it gives up.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import huggingface_hub
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

Component = Literal["blip", "clip"]
ProgressCallback = Callable[[int, int], None]

SHAPES_DEMO = "shapes-demo"
SHAPES_DEMO_DIR = Path(__file__).resolve().parent / "shapes_demo"
BLIP_BASE = "Salesforce/blip-image-captioning-base"
BLIP_LARGE = "Salesforce/blip-image-captioning-large"
CLIP_BASE = "openai/clip-vit-base-patch32"
HUB_PROBE_TIMEOUT_S = 3.0
# Only what from_pretrained needs for a safetensors checkpoint and its processor.
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


@dataclass(frozen=True)
class ModelChoice:
    """A captioner and the CLIP that checks it, as offered in the app's model menu."""

    label: str
    blip_source: str
    clip_source: str


SHAPES_DEMO_CHOICE = ModelChoice("Shapes demo (bundled, offline)", SHAPES_DEMO, SHAPES_DEMO)


def model_choices(local_blip_dir: str | None = None, local_clip_dir: str | None = None) -> list[ModelChoice]:
    """The model menu, most capable first. A local folder comes from server-side configuration
    only (an environment variable or a command-line flag), never from the browser."""
    choices = [
        ModelChoice("BLIP base + CLIP B/32", BLIP_BASE, CLIP_BASE),
        ModelChoice("BLIP large + CLIP B/32", BLIP_LARGE, CLIP_BASE),
        SHAPES_DEMO_CHOICE,
    ]
    if local_blip_dir:
        label = f"Local folder: {Path(local_blip_dir).name}"
        choices.append(ModelChoice(label, local_blip_dir, local_clip_dir or CLIP_BASE))
    return choices


def local_model_dirs(environ: Mapping[str, str] = os.environ) -> tuple[str | None, str | None]:
    """Folders named by VLM_EXPLAINER_BLIP_DIR and VLM_EXPLAINER_CLIP_DIR, if set."""
    return environ.get("VLM_EXPLAINER_BLIP_DIR") or None, environ.get("VLM_EXPLAINER_CLIP_DIR") or None


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded; the message says why in words a user understands."""


def pick_device(preference: str = "auto") -> torch.device:
    """The device to run on: cuda, then mps, then cpu for "auto"; otherwise as asked."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch threads (None leaves it), then restore the previous count.

    On shared, busy cores two threads made the small demo model up to 60 times slower than one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def hub_is_offline() -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE``), read at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_is_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers an HTTP request within ``timeout_s`` (any status counts)."""
    endpoint = os.environ.get("HF_ENDPOINT", huggingface_hub.constants.ENDPOINT)
    request = urllib.request.Request(f"{endpoint.rstrip('/')}/api/models", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # It answered, if only to refuse.
    except (OSError, ValueError):
        return False


def resolve_model_dir(
    source: str, component: Component, on_progress: ProgressCallback | None = None
) -> Path:
    """Turn a source name into a local folder holding a safetensors checkpoint.

    Args:
        source: "shapes-demo", a local folder, or a hub id such as "Salesforce/blip-image-captioning-base".
        component: which bundled demo model "shapes-demo" means ("blip" or "clip").
        on_progress: called with (files done, files total) while a hub download runs.
    Raises:
        ModelUnavailableError: the folder is missing or incomplete, or the hub id is neither
            cached nor downloadable.
    """
    if source == SHAPES_DEMO:
        return _checked_folder(SHAPES_DEMO_DIR / component)
    if Path(source).expanduser().is_dir():
        return _checked_folder(Path(source).expanduser())
    return _hub_snapshot(source, on_progress)


def _checked_folder(folder: Path) -> Path:
    """The folder itself, once it is known to hold a config and safetensors weights."""
    if not (folder / "config.json").is_file():
        raise ModelUnavailableError(f"The model folder {folder} has no config.json.")
    if not any(folder.glob("*.safetensors")):
        raise ModelUnavailableError(
            f"The model folder {folder} has no .safetensors weights "
            "(other weight formats are refused because they can run code when loaded)."
        )
    return folder


def _hub_snapshot(repo_id: str, on_progress: ProgressCallback | None) -> Path:
    """The cached snapshot of ``repo_id``, downloading it first when the hub is reachable."""
    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id, allow_patterns=HUB_FILE_PATTERNS, local_files_only=True
            )
        )
    except LocalEntryNotFoundError:
        pass
    except ValueError as error:  # Not a valid repo id, and not a folder either.
        raise ModelUnavailableError(f"{repo_id!r} is neither a local folder nor a hub model id.") from error
    if hub_is_offline():
        raise ModelUnavailableError(
            f"{repo_id} is not in the local cache and HF_HUB_OFFLINE is set."
        )
    if not hub_is_reachable():
        raise ModelUnavailableError(
            f"{repo_id} is not in the local cache and the Hugging Face hub did not answer "
            f"within {HUB_PROBE_TIMEOUT_S:.0f} s."
        )
    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id,
                allow_patterns=HUB_FILE_PATTERNS,
                tqdm_class=_progress_tqdm(on_progress) if on_progress else None,
            )
        )
    except Exception as error:  # The hub raises many types; the user needs one message.
        raise ModelUnavailableError(f"Downloading {repo_id} failed: {error}") from error


def _progress_tqdm(on_progress: ProgressCallback):
    """A tqdm class that reports snapshot_download's file counter to ``on_progress``."""
    from tqdm.auto import tqdm

    class ProgressTqdm(tqdm):
        def update(self, n=1):
            shown = super().update(n)
            on_progress(int(self.n), int(self.total or 0))
            return shown

    return ProgressTqdm


def load_checkpoint(model_class, processor_class, folder: Path, device: torch.device):
    """Load a model and its processor from a local folder, frozen and in eval mode.

    Parameters never require grad: explanations take gradients with respect to activations
    only, and a shared model must not accumulate ``.grad`` from any session.
    """
    try:
        model = model_class.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
        # The PIL backend gives the same pixels on every machine (torchvision may be absent).
        processor = processor_class.from_pretrained(folder, backend="pil")
    except Exception as error:  # safetensors, tokenizers and transformers each raise their own types
        raise ModelUnavailableError(f"The model in {folder} could not be loaded: {error}") from error
    model.requires_grad_(False)
    return model.eval().to(device), processor
