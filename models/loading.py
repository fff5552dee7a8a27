"""Where model weights come from: the bundled demo, a local folder, or the Hugging Face hub.

Every source ends up as a local folder that ``from_pretrained`` reads with safetensors only
and without remote code. A folder or hub repository that has only PyTorch ``.bin`` weights is
read once by torch's restricted ``weights_only`` unpickler (tensors and plain containers, never
code) and converted to safetensors in a cache folder; a hub repository without safetensors is
first looked for in the hub's own safetensors conversion (a ``refs/pr/N`` revision). A hub id is
looked up in the local cache first; only when it is not cached is the hub probed, with a short
timeout, because transformers alone retries an unreachable hub for minutes before it gives up.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Self

import huggingface_hub
import torch
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors.torch import save_file

Component = Literal["blip", "clip"]
ProgressCallback = Callable[[int, int], None]

SHAPES_DEMO = "shapes-demo"
SHAPES_DEMO_DIR = Path(__file__).resolve().parent / "shapes_demo"
# The second bundled captioner: a decoder-only Qwen2-VL on scenes of varied size and aspect
# ratio; its folder in SHAPES_DEMO_DIR, whichever explainer class asks for it.
SHAPES_DEMO_DECODER = "shapes-demo-decoder"
SHAPES_DEMO_DECODER_FOLDER = "qwen2vl"
BLIP_BASE = "Salesforce/blip-image-captioning-base"
BLIP_LARGE = "Salesforce/blip-image-captioning-large"
CLIP_BASE = "openai/clip-vit-base-patch32"
SMOLVLM_256M = "HuggingFaceTB/SmolVLM-256M-Instruct"  # the chat model small enough for a CPU
LLAVA_15_7B = "llava-hf/llava-1.5-7b-hf"
LLAVA_ONEVISION_05B = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
QWEN2_VL_2B = "Qwen/Qwen2-VL-2B-Instruct"
FLORENCE2_BASE = "florence-community/Florence-2-base"  # 0.23 B: the task captioner for a CPU
BLIP2_OPT_27B = "Salesforce/blip2-opt-2.7b"
HUB_PROBE_TIMEOUT_S = 3.0
# Config, processor and tokenizer files: everything a checkpoint needs besides its weights.
COMPANION_PATTERNS = ["*.json", "*.txt", "*.model"]
# Only what from_pretrained needs for a safetensors checkpoint and its processor.
HUB_FILE_PATTERNS = [*COMPANION_PATTERNS, "*.safetensors"]
# A main branch without safetensors: its PyTorch state dict, to be converted (never TF or Flax weights).
HUB_BIN_PATTERNS = [*COMPANION_PATTERNS, "pytorch_model*.bin"]
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
CONVERTED_WEIGHTS = "model.safetensors"
# How transformers (safetensors_conversion.py) recognises the hub's own conversion of a repository.
CONVERSION_PR_TITLE = "Adding `safetensors` variant of this model"
CONVERSION_BOT = "SFconvertbot"


@dataclass(frozen=True)
class ModelChoice:
    """A captioner and the CLIP that checks it, as offered in the app's model menu."""

    label: str
    captioner_source: str
    clip_source: str


SHAPES_DEMO_CHOICE = ModelChoice("Shapes demo (bundled, offline)", SHAPES_DEMO, SHAPES_DEMO)
SHAPES_DEMO_DECODER_CHOICE = ModelChoice(
    "Shapes demo, decoder-only Qwen2-VL (bundled, offline)", SHAPES_DEMO_DECODER, SHAPES_DEMO
)


def model_choices(local_captioner_dir: str | None = None, local_clip_dir: str | None = None) -> list[ModelChoice]:
    """The model menu, most capable first. A local folder comes from server-side configuration
    only (an environment variable or a command-line flag), never from the browser."""
    choices = [
        ModelChoice("BLIP base + CLIP B/32", BLIP_BASE, CLIP_BASE),
        ModelChoice("BLIP large + CLIP B/32", BLIP_LARGE, CLIP_BASE),
        ModelChoice("Florence-2 base + CLIP B/32", FLORENCE2_BASE, CLIP_BASE),
        ModelChoice("SmolVLM 256M Instruct + CLIP B/32", SMOLVLM_256M, CLIP_BASE),
        ModelChoice("LLaVA-OneVision 0.5B + CLIP B/32", LLAVA_ONEVISION_05B, CLIP_BASE),
        ModelChoice("Qwen2-VL 2B Instruct + CLIP B/32", QWEN2_VL_2B, CLIP_BASE),
        ModelChoice("BLIP-2 OPT 2.7B + CLIP B/32", BLIP2_OPT_27B, CLIP_BASE),
        ModelChoice("LLaVA-1.5 7B + CLIP B/32", LLAVA_15_7B, CLIP_BASE),
        SHAPES_DEMO_CHOICE,
        SHAPES_DEMO_DECODER_CHOICE,
    ]
    if local_captioner_dir:
        label = f"Local folder: {Path(local_captioner_dir).name}"
        choices.append(ModelChoice(label, local_captioner_dir, local_clip_dir or CLIP_BASE))
    return choices


def local_model_dirs(
    environ: Mapping[str, str] = os.environ, arguments: Sequence[str] = ()
) -> tuple[str | None, str | None]:
    """The local (captioner, CLIP) folders that the server names, each None if not named.

    Args:
        environ: read for VLM_EXPLAINER_CAPTIONER_DIR (or its old name VLM_EXPLAINER_BLIP_DIR)
            and VLM_EXPLAINER_CLIP_DIR.
        arguments: command-line words, e.g. ``sys.argv[1:]`` of ``streamlit run app.py --
            --captioner-dir D --clip-dir D``; ``--blip-dir`` is the old name of ``--captioner-dir``.
            Other words are left alone; a flag beats the environment.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--captioner-dir", "--blip-dir", dest="captioner_dir")
    parser.add_argument("--clip-dir", dest="clip_dir")
    flags, _ = parser.parse_known_args(list(arguments))
    captioner_dir = (
        flags.captioner_dir or environ.get("VLM_EXPLAINER_CAPTIONER_DIR") or environ.get("VLM_EXPLAINER_BLIP_DIR")
    )
    return captioner_dir or None, flags.clip_dir or environ.get("VLM_EXPLAINER_CLIP_DIR") or None


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded; the message says why in words a user understands.

    Messages name a server-side folder by its own name, never by the server's full path: the
    page shows them to every user of a shared server.
    """


def folder_name(folder: str | Path) -> str:
    """How a server-side folder is named in messages: its last part, e.g. "my-blip" for /models/my-blip."""
    path = Path(folder).expanduser()
    return path.name or path.absolute().name or str(path)


def source_name(source: str, component: Component) -> str:
    """How a model source is named in messages: a folder by its name, a hub id as written, and the
    bundled demo as "shapes-demo/<component>"."""
    if source == SHAPES_DEMO:
        return f"{SHAPES_DEMO}/{component}"
    if source == SHAPES_DEMO_DECODER:
        return SHAPES_DEMO_DECODER
    if Path(source).expanduser().is_dir():
        return folder_name(source)
    return source


def _without_path(text: str, folder: Path, name: str) -> str:
    """``text`` (a library's error message) with every spelling of ``folder``'s full path replaced by ``name``."""
    spellings = {str(folder), str(folder.expanduser().absolute()), str(folder.expanduser().resolve())}
    for spelling in sorted(spellings, key=len, reverse=True):  # longest first: no half-replaced path
        text = text.replace(spelling, name)
    return text


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
        source: "shapes-demo", "shapes-demo-decoder" (the bundled Qwen2-VL), a local folder, or a
            hub id such as "Salesforce/blip-image-captioning-base".
        component: which bundled demo model "shapes-demo" means ("blip" or "clip").
        on_progress: called with (files done, files total) while a hub download runs.
    Raises:
        ModelUnavailableError: the folder is missing or incomplete, its weights are refused, or the
            hub id is neither cached nor downloadable.
    """
    name = source_name(source, component)
    if source == SHAPES_DEMO:
        return _checked_folder(SHAPES_DEMO_DIR / component, name)
    if source == SHAPES_DEMO_DECODER:
        return _checked_folder(SHAPES_DEMO_DIR / SHAPES_DEMO_DECODER_FOLDER, name)
    if Path(source).expanduser().is_dir():
        return _checked_folder(Path(source).expanduser(), name)
    return _hub_snapshot(source, on_progress)


def _checked_folder(folder: Path, name: str) -> Path:
    """A folder with a config and safetensors weights: ``folder`` itself, or its PyTorch weights converted.

    ``name`` is how messages call the folder (see ``source_name``).
    """
    if not (folder / "config.json").is_file():
        raise ModelUnavailableError(f"The model folder {name} has no config.json.")
    if any(folder.glob("*.safetensors")):
        return folder
    if _has_bin_weights(folder):
        return _converted_folder(folder, name)
    raise ModelUnavailableError(
        f"The model folder {name} has neither .safetensors nor PyTorch .bin weights "
        "(TensorFlow, Flax and other formats are not read)."
    )


def _has_bin_weights(folder: Path) -> bool:
    """Whether ``folder`` holds a PyTorch checkpoint, single-file or sharded."""
    return (folder / BIN_WEIGHTS).is_file() or (folder / BIN_INDEX).is_file()


def _cache_root() -> Path:
    """$VLM_EXPLAINER_CACHE, else ~/.cache/vlm-explainer: never the model's own folder, which may be read-only."""
    return Path(os.environ.get("VLM_EXPLAINER_CACHE") or Path.home() / ".cache" / "vlm-explainer").expanduser()


def _converted_folder(folder: Path, name: str) -> Path:
    """A cache folder with ``folder``'s PyTorch weights as one safetensors file, converted on first use only."""
    shards = _bin_shards(folder, name)
    companions = _companion_files(folder)
    target = _cache_root() / "converted" / _fingerprint([*shards, *companions])
    if target.is_dir():  # Conversions are renamed into place whole: a folder there is complete.
        return target
    state_dict = {}
    for shard in shards:
        state_dict.update(_read_state_dict(shard, name))
    try:
        _write_converted(target, state_dict, companions)
    except OSError as error:
        # The cache's path is the server's business: the reason alone (e.g. "Permission denied").
        raise ModelUnavailableError(
            f"The weights of {name} could not be converted in the server's model cache "
            f"({error.strerror or type(error).__name__}); set VLM_EXPLAINER_CACHE to a writable folder."
        ) from error
    return target


def _bin_shards(folder: Path, name: str) -> list[Path]:
    """The PyTorch weight files of ``folder``: the shards its index names, or the single pytorch_model.bin."""
    index = folder / BIN_INDEX
    if not index.is_file():
        return [folder / BIN_WEIGHTS]
    try:
        shard_names = sorted({str(shard) for shard in json.loads(index.read_text())["weight_map"].values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelUnavailableError(
            f"The weight index {name}/{BIN_INDEX} could not be read ({_without_path(str(error), folder, name)})."
        ) from error
    # An index may only name files beside it: a path elsewhere is no part of this checkpoint.
    missing = [shard for shard in shard_names if Path(shard).name != shard or not (folder / shard).is_file()]
    if not shard_names or missing:
        raise ModelUnavailableError(
            f"The weight index {name}/{BIN_INDEX} names shards that are not in {name}: {missing}."
        )
    return [folder / shard for shard in shard_names]


def _companion_files(folder: Path) -> list[Path]:
    """Config, processor and tokenizer files of ``folder``, without the index of .bin shards that are not copied."""
    found = {path for pattern in COMPANION_PATTERNS for path in folder.glob(pattern) if path.is_file()}
    return sorted(path for path in found if path.name != BIN_INDEX)


def _fingerprint(files: list[Path]) -> str:
    """A cache key that changes when any file is replaced or edited: resolved path, size and modification time."""
    stats = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def _read_state_dict(path: Path, folder_label: str) -> dict[str, torch.Tensor]:
    """The named tensors in a PyTorch .bin file, read by torch's restricted ``weights_only`` unpickler.

    That unpickler builds tensors and plain containers only; a pickle that asks for anything else
    (such as a function to call, which is how a pickle runs code) is refused before it runs.
    Messages call the file "<folder_label>/<file name>".
    """
    shown = f"{folder_label}/{path.name}"
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message is a page of advice; the line that names the refused item is its context.
        detail = str(error.__context__ or error).strip().splitlines()[0]
        raise ModelUnavailableError(
            f"The weights {shown} are refused: they are not plain tensors, and loading them any other way "
            f"could run code ({_without_path(detail, path.parent, folder_label)})."
        ) from error
    except Exception as error:  # A truncated or foreign file: torch raises RuntimeError, EOFError, OSError ...
        reason = _without_path(str(error), path.parent, folder_label)
        raise ModelUnavailableError(f"The weights {shown} are not a readable PyTorch checkpoint ({reason}).") from error
    if not isinstance(state_dict, dict) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state_dict.items()
    ):
        raise ModelUnavailableError(f"The weights {shown} are refused: they are not a state dict of named tensors.")
    return state_dict


def _write_converted(target: Path, state_dict: dict[str, torch.Tensor], companions: list[Path]) -> None:
    """Write a safetensors checkpoint folder beside ``target`` and rename it into place.

    The rename is atomic, so no session ever reads half a checkpoint; when another session
    finished the same conversion first, its folder is kept and this one dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(_unshared(state_dict), staging / CONVERTED_WEIGHTS, metadata={"format": "pt"})
        for companion in companions:
            shutil.copyfile(companion, staging / companion.name)
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors, contiguous and each with its own memory.

    safetensors refuses tensors that share storage, which tied weights do (BLIP's decoder output
    and word embeddings): every tensor after the first on a storage is copied.
    """
    seen_storages = set()
    unshared = {}
    for name, tensor in state_dict.items():
        storage = tensor.untyped_storage().data_ptr()
        unshared[name] = tensor.clone().contiguous() if storage in seen_storages else tensor.contiguous()
        seen_storages.add(storage)
    return unshared


def _hub_snapshot(repo_id: str, on_progress: ProgressCallback | None) -> Path:
    """The cached snapshot of ``repo_id``, downloading it first when the hub is reachable."""
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except ValueError as error:  # Not a valid repo id, and not a folder either: most likely a mistyped path.
        shown = folder_name(repo_id)
        raise ModelUnavailableError(f"{shown!r} is neither a local folder nor a hub model id.") from error
    cached = _cached_hub_folder(repo_id)
    if cached is not None:
        return _checked_folder(cached, repo_id)
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
        folder = _downloaded_hub_folder(repo_id, on_progress)
    except Exception as error:  # The hub raises many types; the user needs one message.
        reason = _without_path(str(error), Path(huggingface_hub.constants.HF_HUB_CACHE), "the hub cache")
        raise ModelUnavailableError(f"Downloading {repo_id} failed: {reason}") from error
    return _checked_folder(folder, repo_id)


def _cached_hub_folder(repo_id: str) -> Path | None:
    """A cached snapshot of ``repo_id`` that holds weights, found without the network; None when there is none.

    Looked for in order: main with safetensors, the hub's safetensors conversion downloaded
    before, main with a PyTorch state dict (converted by the caller).
    """
    for revision in ("main", _recorded_conversion(repo_id)):
        folder = _cached_snapshot(repo_id, revision, HUB_FILE_PATTERNS) if revision else None
        if folder is not None and any(folder.glob("*.safetensors")):
            return folder
    folder = _cached_snapshot(repo_id, "main", HUB_BIN_PATTERNS)
    return folder if folder is not None and _has_bin_weights(folder) else None


def _cached_snapshot(repo_id: str, revision: str, patterns: list[str]) -> Path | None:
    """The complete cached snapshot of ``repo_id`` at ``revision`` for ``patterns``, or None."""
    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, local_files_only=True
            )
        )
    except LocalEntryNotFoundError:
        return None


def _downloaded_hub_folder(repo_id: str, on_progress: ProgressCallback | None) -> Path:
    """Download safetensors from main, else from the hub's safetensors conversion, else main's PyTorch state dict."""
    api = huggingface_hub.HfApi()
    if _has_top_level_safetensors(api.list_repo_files(repo_id)):
        return _download(repo_id, "main", HUB_FILE_PATTERNS, on_progress)
    conversion = _conversion_revision(api, repo_id)
    if conversion is None:
        return _download(repo_id, "main", HUB_BIN_PATTERNS, on_progress)
    folder = _download(repo_id, conversion, HUB_FILE_PATTERNS, on_progress)
    _record_conversion(repo_id, conversion)
    return folder


def _download(repo_id: str, revision: str, patterns: list[str], on_progress: ProgressCallback | None) -> Path:
    """Download (or complete) the snapshot of ``repo_id`` at ``revision``, only the files ``patterns`` match;
    a model the machine could not hold is refused before its weights are downloaded."""
    refuse_if_too_large(_hub_weight_bytes(repo_id, revision, patterns), repo_id)
    return Path(
        huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            tqdm_class=_progress_tqdm(on_progress) if on_progress else None,
        )
    )


def _hub_weight_bytes(repo_id: str, revision: str, patterns: list[str]) -> int:
    """Bytes of the weight files (safetensors or PyTorch .bin) at ``revision`` that ``patterns`` select."""
    info = huggingface_hub.HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    return sum(
        sibling.size or 0
        for sibling in info.siblings
        if sibling.rfilename.endswith((".safetensors", ".bin"))
        and any(fnmatch.fnmatch(sibling.rfilename, pattern) for pattern in patterns)
    )


def _has_top_level_safetensors(file_names: list[str]) -> bool:
    """Whether a repository listing has safetensors weights where from_pretrained reads them."""
    return any(name.endswith(".safetensors") and "/" not in name for name in file_names)


def _conversion_revision(api: huggingface_hub.HfApi, repo_id: str) -> str | None:
    """The ``refs/pr/N`` revision holding the hub's safetensors conversion of main, or None.

    Found as transformers' ``safetensors_conversion.previous_pr`` finds it: an open pull request
    with the conversion title, opened by the conversion bot (anyone else's could hold other
    weights), whose parent is main's head (so it converts today's weights, not older ones).
    """
    main_head = api.list_repo_commits(repo_id)[0].commit_id
    try:
        pulls = list(
            api.get_repo_discussions(
                repo_id, author=CONVERSION_BOT, discussion_type="pull_request", discussion_status="open"
            )
        )
    except HfHubHTTPError:  # A repository may switch discussions off: then it has no conversion.
        return None
    for pull in pulls:
        if _is_current_conversion(api, repo_id, pull, main_head):
            return pull.git_reference
    return None


def _is_current_conversion(
    api: huggingface_hub.HfApi, repo_id: str, pull: huggingface_hub.Discussion, main_head: str
) -> bool:
    """Whether a discussion is the conversion bot's open pull request of main's head with safetensors in it."""
    if not (
        pull.is_pull_request
        and pull.status == "open"
        and pull.author == CONVERSION_BOT
        and pull.title == CONVERSION_PR_TITLE
    ):
        return False
    commits = api.list_repo_commits(repo_id, revision=pull.git_reference)
    return (
        len(commits) > 1
        and commits[1].commit_id == main_head
        and _has_top_level_safetensors(api.list_repo_files(repo_id, revision=pull.git_reference))
    )


def _conversion_record(repo_id: str) -> Path:
    """The file that remembers which revision holds ``repo_id``'s safetensors conversion, for offline starts."""
    return _cache_root() / "hub-conversions" / repo_id.replace("/", "--")


def _recorded_conversion(repo_id: str) -> str | None:
    """The conversion revision recorded for ``repo_id`` by an earlier download, or None."""
    record = _conversion_record(repo_id)
    revision = record.read_text().strip() if record.is_file() else ""
    return revision if re.fullmatch(r"refs/pr/\d+", revision) else None


def _record_conversion(repo_id: str, revision: str) -> None:
    """Remember ``revision`` for ``repo_id``; written whole (temporary file, then rename)."""
    record = _conversion_record(repo_id)
    record.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=record.parent, delete=False) as temporary:
        temporary.write(revision)
    os.replace(temporary.name, record)


def _progress_tqdm(on_progress: ProgressCallback):
    """A tqdm class that reports snapshot_download's file counter to ``on_progress``."""
    from tqdm.auto import tqdm

    class ProgressTqdm(tqdm):
        def update(self, n=1):
            shown = super().update(n)
            on_progress(int(self.n), int(self.total or 0))
            return shown

    return ProgressTqdm


# Loading holds the weights once, plus what a forward and a gradient pass need beside them.
MEMORY_HEADROOM = 1.3


def available_memory_bytes() -> int | None:
    """Memory the system can give without swapping (Linux's MemAvailable); None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(folder: Path, name: str, dtype: torch.dtype = torch.float32) -> None:
    """Refuse, before loading, a model larger than the memory this machine has free: loading it
    anyway would swap the shared server to a halt or get the process killed.

    Raises:
        ModelUnavailableError: with what the model needs and what is free.
    """
    stored = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    # The files may hold another precision than the model will; float32 files are the usual case.
    refuse_if_too_large(int(stored * dtype.itemsize / 4), name)


def refuse_if_too_large(weight_bytes: int, name: str) -> None:
    """Raise ModelUnavailableError when weights of this size would not fit in the free memory."""
    needed = weight_bytes * MEMORY_HEADROOM
    free = available_memory_bytes()
    if free is not None and needed > free:
        raise ModelUnavailableError(
            f"{name} needs about {needed / 2**30:.1f} GB of memory (its weights are {weight_bytes / 2**30:.1f} GB), "
            f"and this machine has {free / 2**30:.1f} GB free. Choose a smaller model."
        )


# Precisions offered: bfloat16 halves the memory of a model; CPU and CUDA compute in it.
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_checkpoint(
    model_class, processor_class, folder: Path, device: torch.device, name: str | None = None,
    precision: str = "float32",
):
    """Load a model and its processor from a local folder, frozen and in eval mode.

    Parameters never require grad: explanations take gradients with respect to activations
    only, and a shared model must not accumulate ``.grad`` from any session. ``name`` is how
    messages call the model (``source_name``; the folder's own name when None).

    Raises:
        ModelUnavailableError: the folder cannot be read, or its weights do not fit
            ``model_class`` (transformers would only warn, initialise the missing weights at
            random and explain a random model without a word).
    """
    name = name or folder_name(folder)
    check_memory(folder, name, PRECISIONS[precision])
    try:
        model, loading_info = model_class.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=False, output_loading_info=True,
            dtype=PRECISIONS[precision],
        )
        # The PIL backend gives the same pixels on every machine (torchvision may be absent).
        processor = processor_class.from_pretrained(folder, backend="pil")
    except Exception as error:  # safetensors, tokenizers and transformers each raise their own types
        reason = _without_path(str(error), folder, name)
        raise ModelUnavailableError(f"The model in {name} could not be loaded: {reason}") from error
    misfits = {
        kind: sorted(loading_info.get(key) or [])
        for kind, key in [("missing", "missing_keys"), ("unexpected", "unexpected_keys")]
    }
    if any(misfits.values()):
        described = "; ".join(
            f"{len(names)} {kind} (e.g. {', '.join(names[:3])})" for kind, names in misfits.items() if names
        )
        raise ModelUnavailableError(
            f"The weights in {name} do not fit {model_class.__name__}: {described}. "
            "It is probably a different kind of model; nothing was explained with random weights."
        )
    model.requires_grad_(False)
    return model.eval().to(device), processor


class PretrainedExplainer:
    """What every explainer class (captioner families and CLIP alike) loads with: one
    ``from_pretrained``. A subclass declares its model and processor classes, the
    ``config.model_type`` values it explains, its role in the app (for messages) and which
    bundled demo folder "shapes-demo" means for it, and is built from (model, processor, device)."""

    model_class: ClassVar[type]
    processor_class: ClassVar[type]
    model_types: ClassVar[tuple[str, ...]]
    role: ClassVar[str]  # "captioner", "CLIP checker"
    demo_component: ClassVar[Component]

    @classmethod
    def from_pretrained(
        cls, source: str, device: str = "auto", on_progress: ProgressCallback | None = None, precision: str = "float32"
    ) -> Self:
        """Load from a hub id, a local folder or "shapes-demo" (see ``resolve_model_dir``), frozen,
        on ``device`` ("auto": cuda, then mps, then cpu), in ``precision`` (a key of PRECISIONS).

        Raises:
            ModelUnavailableError: as ``resolve_model_dir``; or the folder holds another kind of
                model (checked on its config.json before any weights are read); or its weights
                do not load or do not fit.
        """
        folder = resolve_model_dir(source, cls.demo_component, on_progress)
        name = source_name(source, cls.demo_component)
        check_model_type(folder, name, cls.model_types, cls.role)
        return explainer_from_folder(cls, folder, pick_device(device), name, precision)


def explainer_from_folder(
    explainer_class, folder: Path, device: torch.device, name: str | None = None, precision: str = "float32"
):
    """An explainer of ``explainer_class`` on the checkpoint in a resolved local folder
    (``name``: how messages call it, see ``load_checkpoint``)."""
    model, processor = load_checkpoint(
        explainer_class.model_class, explainer_class.processor_class, folder, device, name, precision
    )
    return explainer_class(model, processor, device)


def model_type_of(folder: Path, name: str | None = None) -> str:
    """The ``model_type`` that a checkpoint folder's config.json declares ("" if none)."""
    try:
        return str(json.loads((folder / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError, AttributeError) as error:
        name = name or folder_name(folder)
        reason = _without_path(str(error), folder, name)
        raise ModelUnavailableError(f"The config.json in {name} cannot be read: {reason}") from error


def check_model_type(folder: Path, name: str, accepted: Sequence[str], role: str) -> str:
    """The ``model_type`` of the checkpoint in ``folder`` when it is one of ``accepted``.

    Read from config.json alone, before any weights: a CLIP folder named as the captioner (or
    the other way round) gets a message that says what the folder holds, instead of
    transformers' report of mismatched weights.

    Args:
        folder: a resolved checkpoint folder.
        name: how messages call it (``source_name``).
        accepted: the model types that may fill ``role``.
        role: what the model is for in the app, e.g. "captioner" or "CLIP checker".

    Raises:
        ModelUnavailableError: e.g. "my-clip holds a 'clip' model, which is not a captioner the
            app supports; supported captioner types: blip."
    """
    model_type = model_type_of(folder, name)
    if model_type in accepted:
        return model_type
    held = f"a {model_type!r} model" if model_type else "a model whose config.json names no model_type"
    raise ModelUnavailableError(
        f"{name} holds {held}, which is not a {role} the app supports; "
        f"supported {role} types: {', '.join(accepted)}."
    )
