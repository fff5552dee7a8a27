"""Model sources: local folders, safetensors or converted PyTorch state dicts, and a hub that does not answer."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

from models import loading
from models.blip_explainer import BlipExplainer
from models.clip_explainer import ClipExplainer
from models.families import explainer_for_model, load_captioner, supported_model_types
from models.loading import (
    HUB_BIN_PATTERNS,
    HUB_FILE_PATTERNS,
    ModelUnavailableError,
    local_model_dirs,
    resolve_model_dir,
    source_name,
)
from tests.tiny_models import BOS_ID, IMAGE_SIZE, SEP_ID, VOCABULARY

NOT_CACHED = "vlm-explainer-tests/not-a-cached-model"
BIN_ONLY_REPO = "vlm-explainer-tests/bin-only-captioner"
CONVERSION_TITLE = "Adding `safetensors` variant of this model"


@pytest.fixture(autouse=True)
def conversion_cache(tmp_path, monkeypatch):
    """Converted checkpoints go to this test's own folder, never to the user's cache."""
    cache = tmp_path / "vlm-cache"
    monkeypatch.setenv("VLM_EXPLAINER_CACHE", str(cache))
    return cache


def bin_checkpoint(tiny_blip_dir, state_dict, folder, shards: int = 1):
    """``tiny_blip_dir`` with its safetensors weights replaced by ``state_dict`` as pytorch_model .bin shard(s)."""
    folder.mkdir()
    for item in tiny_blip_dir.iterdir():
        if item.suffix != ".safetensors":
            shutil.copyfile(item, folder / item.name)
    if shards == 1:
        torch.save(state_dict, folder / "pytorch_model.bin")
        return folder
    names = list(state_dict)
    weight_map = {}
    for shard in range(shards):
        shard_name = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
        part = {name: state_dict[name] for name in names[shard::shards]}
        torch.save(part, folder / shard_name)
        weight_map.update(dict.fromkeys(part, shard_name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def decoder_logits(model) -> torch.Tensor:
    """Teacher-forced caption logits of a fixed noise image and a fixed word sequence."""
    pixel_values = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[BOS_ID, VOCABULARY["a"], VOCABULARY["red"], VOCABULARY["circle"], SEP_ID]])
    with torch.no_grad():
        return model(pixel_values=pixel_values, input_ids=input_ids).logits


class WritesMarker:
    """Pickles into a call of ``exec`` that creates ``marker``: the way a malicious .bin runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_local_folder_loads_through_from_pretrained(tiny_blip_dir):
    explainer = BlipExplainer.from_pretrained(str(tiny_blip_dir), device="cpu")
    assert explainer.image_geometry((32, 32)).views[0].grid_shape == (4, 4)
    assert not any(parameter.requires_grad for parameter in explainer.model.parameters())


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelUnavailableError, match="config.json"):
        resolve_model_dir(str(tmp_path), "blip")


@pytest.mark.parametrize("shards", [1, 2])
def test_state_dict_bin_is_converted_and_gives_the_original_logits(
    tmp_path, tiny_blip, tiny_blip_dir, conversion_cache, shards
):
    state_dict = tiny_blip.model.state_dict()
    storages = {tensor.untyped_storage().data_ptr() for tensor in state_dict.values()}
    assert len(storages) < len(state_dict), "tied weights share storage, which safetensors refuses"
    folder = bin_checkpoint(tiny_blip_dir, state_dict, tmp_path / "bin_model", shards)
    files_before = sorted(path.name for path in folder.iterdir())

    converted = BlipExplainer.from_pretrained(str(folder), device="cpu")

    assert torch.equal(decoder_logits(converted.model), decoder_logits(tiny_blip.model))
    assert converted.processor.tokenizer.get_vocab() == tiny_blip.processor.tokenizer.get_vocab()
    assert sorted(path.name for path in folder.iterdir()) == files_before, "the user's folder is not written"
    converted_dir = resolve_model_dir(str(folder), "blip")
    assert converted_dir.parent == conversion_cache / "converted"
    assert (converted_dir / "model.safetensors").is_file()
    assert not list(converted_dir.glob("*.bin*"))


def test_conversion_runs_once_until_the_weights_change(tmp_path, tiny_blip, tiny_blip_dir, monkeypatch):
    folder = bin_checkpoint(tiny_blip_dir, tiny_blip.model.state_dict(), tmp_path / "bin_model")
    real_load = torch.load
    calls = []

    def counting_load(*args, **kwargs):
        calls.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    first = resolve_model_dir(str(folder), "blip")
    second = resolve_model_dir(str(folder), "blip")
    assert (first, len(calls)) == (second, 1)

    bin_path = folder / "pytorch_model.bin"
    os.utime(bin_path, ns=(bin_path.stat().st_atime_ns, bin_path.stat().st_mtime_ns + 1_000_000_000))
    assert resolve_model_dir(str(folder), "blip") != first
    assert len(calls) == 2


def test_a_session_that_converts_second_keeps_the_first_sessions_folder(
    tmp_path, tiny_blip, tiny_blip_dir, conversion_cache, monkeypatch
):
    folder = bin_checkpoint(tiny_blip_dir, tiny_blip.model.state_dict(), tmp_path / "bin_model")
    real_load = torch.load
    other_session = {}

    def load_while_another_session_converts(*args, **kwargs):
        if not other_session:  # The other session reads, converts and renames before this read returns.
            other_session["started"] = True
            other_session["folder"] = resolve_model_dir(str(folder), "blip")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load_while_another_session_converts)
    assert resolve_model_dir(str(folder), "blip") == other_session["folder"]
    assert [path.name for path in (conversion_cache / "converted").iterdir()] == [other_session["folder"].name]
    explainer = BlipExplainer.from_pretrained(str(folder), device="cpu")
    assert torch.equal(decoder_logits(explainer.model), decoder_logits(tiny_blip.model))


def test_bin_whose_pickle_would_run_code_is_refused_and_the_code_never_runs(tmp_path, conversion_cache):
    marker = tmp_path / "code-ran"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    bin_path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.ones(2), "payload": WritesMarker(marker)}, bin_path)

    with pytest.raises(ModelUnavailableError, match=r"refused.*could run code") as refusal:
        resolve_model_dir(str(tmp_path), "blip")
    assert f"{tmp_path.name}/pytorch_model.bin" in str(refusal.value)
    assert str(tmp_path.parent) not in str(refusal.value)  # the folder's name, not the server's path
    assert not marker.exists()
    assert not (conversion_cache / "converted").exists()

    torch.load(bin_path, weights_only=False)  # The control: an unrestricted load does run the payload.
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"pytorch_model.bin": b"not loaded, ever"}, r"pytorch_model.bin are refused"),
        ({"pytorch_model.bin": "tensor list"}, r"refused: they are not a state dict of named tensors"),
        ({"pytorch_model.bin": "truncated"}, r"not a readable PyTorch checkpoint"),
        ({"pytorch_model.bin.index.json": {"weight_map": {"w": "../elsewhere.bin"}}}, r"names shards that are not in"),
        ({"tf_model.h5": b"HDF"}, r"neither .safetensors nor PyTorch .bin weights"),
    ],
    ids=["garbage", "not-a-state-dict", "truncated", "shard-outside-the-folder", "tensorflow-only"],
)
def test_unusable_weights_give_one_clear_error(tmp_path, files, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    for name, content in files.items():
        if content == "tensor list":
            torch.save([torch.ones(2)], tmp_path / name)
        elif content == "truncated":
            torch.save({"weight": torch.ones(2)}, tmp_path / name)
            (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:100])
        elif isinstance(content, dict):
            (tmp_path / name).write_text(json.dumps(content))
        else:
            (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelUnavailableError, match=message) as refusal:
        resolve_model_dir(str(tmp_path), "blip")
    assert tmp_path.name in str(refusal.value)
    assert str(tmp_path.parent) not in str(refusal.value)  # the folder's name, not the server's path


def test_conversion_into_an_unwritable_cache_says_where(tmp_path, tiny_blip, tiny_blip_dir, monkeypatch):
    folder = bin_checkpoint(tiny_blip_dir, tiny_blip.model.state_dict(), tmp_path / "bin_model")
    not_a_folder = tmp_path / "cache-is-a-file"
    not_a_folder.write_text("")
    monkeypatch.setenv("VLM_EXPLAINER_CACHE", str(not_a_folder))
    with pytest.raises(ModelUnavailableError, match="could not be converted.*VLM_EXPLAINER_CACHE") as refusal:
        resolve_model_dir(str(folder), "blip")
    assert "bin_model" in str(refusal.value) and str(tmp_path) not in str(refusal.value)


def test_broken_folder_gives_one_clear_error(tmp_path, tiny_blip_dir):
    for item in tiny_blip_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelUnavailableError, match="could not be loaded") as refusal:
        BlipExplainer.from_pretrained(str(tmp_path), device="cpu")
    assert f"The model in {tmp_path.name} " in str(refusal.value)
    assert str(tmp_path.parent) not in str(refusal.value)


def test_uncached_model_with_hub_switched_off_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE"):
        resolve_model_dir(NOT_CACHED, "blip")
    assert time.monotonic() - started < 1.0


def test_uncached_model_with_silent_hub_fails_within_five_seconds(monkeypatch):
    """A hub that accepts the connection and never answers (the slow failure mode)."""
    with socket.socket() as silent_server:
        silent_server.bind(("127.0.0.1", 0))
        silent_server.listen(1)  # never accepted: the client's request hangs
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent_server.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(ModelUnavailableError, match="did not answer"):
            resolve_model_dir(NOT_CACHED, "blip")
        assert time.monotonic() - started < 5.0


def test_nonsense_source_is_named_in_the_error():
    with pytest.raises(ModelUnavailableError, match="neither a local folder nor a hub model id"):
        resolve_model_dir("no such folder / with spaces", "blip")


def test_a_captioner_folder_is_explained_by_the_family_its_config_names(tiny_blip_dir):
    captioner = load_captioner(str(tiny_blip_dir), device="cpu")
    assert type(captioner) is BlipExplainer
    assert captioner.default_method in captioner.methods


def named_copy(source, folder):
    """A copy of the checkpoint folder ``source`` at ``folder`` (its name is what messages must show)."""
    shutil.copytree(source, folder)
    return folder


def weights_never_read(*args, **kwargs):
    pytest.fail("the weights were read: the model type should have been refused from config.json first")


def test_a_clip_folder_named_as_the_captioner_is_said_to_hold_a_clip_model(tmp_path, tiny_clip_dir, monkeypatch):
    folder = named_copy(tiny_clip_dir, tmp_path / "servers" / "my-clip")
    monkeypatch.setattr(loading, "load_checkpoint", weights_never_read)
    with pytest.raises(ModelUnavailableError) as refusal:
        load_captioner(str(folder), device="cpu")
    message = str(refusal.value)
    assert message.startswith("my-clip holds a 'clip' model, which is not a captioner")
    assert message.endswith(f"supported captioner types: {', '.join(supported_model_types())}.")
    assert str(folder.parent) not in message


def test_a_blip_folder_named_as_the_clip_checker_is_said_to_hold_a_blip_model(tmp_path, tiny_blip_dir, monkeypatch):
    folder = named_copy(tiny_blip_dir, tmp_path / "servers" / "my-blip")
    monkeypatch.setattr(loading, "load_checkpoint", weights_never_read)
    with pytest.raises(ModelUnavailableError) as refusal:
        ClipExplainer.from_pretrained(str(folder), device="cpu")
    message = str(refusal.value)
    assert message.startswith("my-blip holds a 'blip' model, which is not a CLIP checker")
    assert message.endswith("supported CLIP checker types: clip.")
    assert str(folder.parent) not in message


def test_a_family_class_refuses_a_folder_of_another_model_type(tmp_path, tiny_clip_dir):
    folder = named_copy(tiny_clip_dir, tmp_path / "my-clip")
    with pytest.raises(ModelUnavailableError, match=r"^my-clip holds a 'clip' model.*supported captioner types: blip"):
        BlipExplainer.from_pretrained(str(folder), device="cpu")


def test_a_config_without_model_type_is_named_as_such(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    expected = f"^{tmp_path.name} holds a model whose config.json names no model_type"
    with pytest.raises(ModelUnavailableError, match=expected):
        load_captioner(str(tmp_path), device="cpu")


def test_an_unreadable_config_names_the_folder_only(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelUnavailableError, match=f"config.json in {tmp_path.name} cannot be read") as refusal:
        load_captioner(str(tmp_path), device="cpu")
    assert str(tmp_path.parent) not in str(refusal.value)


def test_a_mistyped_folder_is_named_without_the_servers_path(tmp_path):
    with pytest.raises(ModelUnavailableError, match="'no-such-model' is neither a local folder") as refusal:
        resolve_model_dir(str(tmp_path / "no-such-model"), "blip")
    assert str(tmp_path) not in str(refusal.value)


def test_the_name_shown_for_a_source(tmp_path):
    assert source_name("shapes-demo", "clip") == "shapes-demo/clip"
    assert source_name(str(tmp_path), "blip") == tmp_path.name
    assert source_name(f"{tmp_path}/", "blip") == tmp_path.name
    assert source_name("Salesforce/blip-image-captioning-base", "blip") == "Salesforce/blip-image-captioning-base"


def test_a_built_model_gets_the_explainer_of_its_family(tiny_blip, tiny_clip):
    explainer = explainer_for_model(tiny_blip.model, tiny_blip.processor, flush_denormals=False)
    assert type(explainer) is BlipExplainer and not explainer.flush_denormals
    with pytest.raises(ModelUnavailableError, match="supported types: blip"):
        explainer_for_model(tiny_clip.model, tiny_clip.processor)


def test_weights_that_do_not_fit_the_class_are_refused_not_reinitialised(tmp_path, tiny_blip_dir):
    """transformers only warns about missing or unexpected weights and draws the missing ones at
    random: an explainer must refuse, or it would explain a random model without a word."""
    for item in tiny_blip_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(name for name in weights if name.startswith("vision_model.encoder.layers.0."))
    del weights[dropped]
    weights["qformer.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    expected = rf"do not fit BlipForConditionalGeneration: 1 missing \(e\.g\. {re.escape(dropped)}\); 1 unexpected"
    with pytest.raises(ModelUnavailableError, match=expected) as refusal:
        load_captioner(str(tmp_path), device="cpu")
    assert str(tmp_path.parent) not in str(refusal.value)


def test_captioner_folder_from_the_environment_under_its_new_and_its_old_name():
    assert local_model_dirs({"VLM_EXPLAINER_CAPTIONER_DIR": "/models/a"}) == ("/models/a", None)
    old_names = {"VLM_EXPLAINER_BLIP_DIR": "/models/b", "VLM_EXPLAINER_CLIP_DIR": "/models/c"}
    assert local_model_dirs(old_names) == ("/models/b", "/models/c")
    both = {"VLM_EXPLAINER_CAPTIONER_DIR": "/models/new", "VLM_EXPLAINER_BLIP_DIR": "/models/old"}
    assert local_model_dirs(both) == ("/models/new", None)


def test_captioner_folder_from_the_command_line_under_its_new_and_its_old_name():
    flags = ["--captioner-dir", "/models/a", "--clip-dir", "/models/c"]
    assert local_model_dirs({}, flags) == ("/models/a", "/models/c")
    assert local_model_dirs({}, ["--blip-dir=/models/b"]) == ("/models/b", None)
    environment = {"VLM_EXPLAINER_CAPTIONER_DIR": "/models/env", "VLM_EXPLAINER_CLIP_DIR": "/models/env-clip"}
    assert local_model_dirs(environment, ["--captioner-dir", "/models/flag"]) == ("/models/flag", "/models/env-clip")
    # Streamlit's own words and unknown flags are no concern of this parser.
    assert local_model_dirs({}, ["--server.port", "8501", "--other", "x", "--captioner", "y"]) == (None, None)


class FakeHub:
    """The hub and its local cache for one repository, in memory: revision -> files, commits and snapshot folder.

    Stands in for ``huggingface_hub.HfApi`` and ``snapshot_download``; a revision counts as cached
    once it was downloaded (or when listed in ``cached``), as in the real cache.
    """

    def __init__(self, revisions: dict, pulls: list, cached: set = frozenset()):
        self.revisions, self.pulls, self.cached = revisions, pulls, set(cached)
        self.downloads = []
        self.discussions_error = None

    def list_repo_files(self, repo_id, revision="main"):
        return self.revisions[revision]["files"]

    def model_info(self, repo_id, revision="main", files_metadata=False):
        folder = Path(self.revisions[revision]["folder"])
        sizes = {name: (folder / name).stat().st_size if (folder / name).exists() else 0
                 for name in self.revisions[revision]["files"]}
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=name, size=size) for name, size in sizes.items()])

    def list_repo_commits(self, repo_id, revision="main"):
        return [SimpleNamespace(commit_id=commit) for commit in self.revisions[revision]["commits"]]

    def get_repo_discussions(self, repo_id, **filters):
        if self.discussions_error is not None:
            raise self.discussions_error
        return iter(self.pulls)

    def snapshot_download(self, repo_id, revision="main", allow_patterns=None, local_files_only=False, tqdm_class=None):
        if local_files_only and revision not in self.cached:
            raise LocalEntryNotFoundError(f"{repo_id}@{revision} is not cached")
        if not local_files_only:
            self.downloads.append((revision, allow_patterns))
            self.cached.add(revision)
        return str(self.revisions[revision]["folder"])


def conversion_pull(number: int, **changes) -> SimpleNamespace:
    """The conversion bot's open pull request, as get_repo_discussions lists it, with ``changes``."""
    fields = dict(title=CONVERSION_TITLE, author="SFconvertbot", status="open", is_pull_request=True)
    return SimpleNamespace(num=number, git_reference=f"refs/pr/{number}", **{**fields, **changes})


@pytest.fixture
def bin_only_hub(tmp_path, tiny_blip, tiny_blip_dir, monkeypatch):
    """A reachable hub whose repository has only pytorch_model.bin on main and a current conversion as refs/pr/3."""
    bin_folder = bin_checkpoint(tiny_blip_dir, tiny_blip.model.state_dict(), tmp_path / "main-snapshot")
    hub = FakeHub(
        revisions={
            "main": {
                "files": ["config.json", "pytorch_model.bin", "tf_model.h5"],
                "commits": ["c2", "c1"],
                "folder": bin_folder,
            },
            "refs/pr/3": {
                "files": ["config.json", "pytorch_model.bin", "model.safetensors"],
                "commits": ["p3", "c2", "c1"],
                "folder": tiny_blip_dir,
            },
        },
        pulls=[conversion_pull(3)],
    )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "hub_is_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    return hub


def switch_the_hub_off(monkeypatch):
    """From here on any look-up on the hub fails the test: only the local cache may answer."""

    def no_hub():
        raise AssertionError("the hub was asked although the model is cached")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "HfApi", no_hub)


def test_hub_repo_without_safetensors_loads_its_conversion_pull_request(
    bin_only_hub, tiny_blip_dir, conversion_cache, monkeypatch
):
    assert resolve_model_dir(BIN_ONLY_REPO, "blip") == tiny_blip_dir
    assert bin_only_hub.downloads == [("refs/pr/3", HUB_FILE_PATTERNS)]
    assert not (conversion_cache / "converted").exists()

    switch_the_hub_off(monkeypatch)  # The next start is offline: the conversion is found in the cache.
    assert resolve_model_dir(BIN_ONLY_REPO, "blip") == tiny_blip_dir
    assert len(bin_only_hub.downloads) == 1


@pytest.mark.parametrize(
    "pull_changes",
    [{"author": "someone-else"}, {"status": "closed"}, {"title": "Add safetensors"}, {"stale": True}, None],
    ids=["not-the-bot", "closed", "other-title", "older-than-main", "no-pull-requests"],
)
def test_hub_repo_without_a_usable_conversion_loads_its_bin_converted(
    bin_only_hub, tiny_blip, conversion_cache, monkeypatch, pull_changes
):
    if pull_changes is None:
        bin_only_hub.pulls = []
    elif pull_changes == {"stale": True}:  # Converted before main's last commit: it may hold older weights.
        bin_only_hub.revisions["refs/pr/3"]["commits"] = ["p3", "c1"]
    else:
        bin_only_hub.pulls = [conversion_pull(3, **pull_changes)]

    folder = resolve_model_dir(BIN_ONLY_REPO, "blip")

    assert bin_only_hub.downloads == [("main", HUB_BIN_PATTERNS)]
    assert folder.parent == conversion_cache / "converted"
    explainer = BlipExplainer.from_pretrained(BIN_ONLY_REPO, device="cpu")
    assert torch.equal(decoder_logits(explainer.model), decoder_logits(tiny_blip.model))

    switch_the_hub_off(monkeypatch)  # The next start is offline: the cached .bin and its conversion serve.
    assert resolve_model_dir(BIN_ONLY_REPO, "blip") == folder


def test_hub_repo_with_discussions_switched_off_loads_its_bin_converted(bin_only_hub, conversion_cache):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/x/discussions")
    bin_only_hub.discussions_error = HfHubHTTPError(
        "discussions disabled", response=httpx2.Response(403, request=request)
    )
    assert resolve_model_dir(BIN_ONLY_REPO, "blip").parent == conversion_cache / "converted"
    assert bin_only_hub.downloads == [("main", HUB_BIN_PATTERNS)]


def test_hub_repo_with_safetensors_on_main_downloads_main_only(bin_only_hub, tiny_blip_dir):
    bin_only_hub.revisions["main"].update(files=["config.json", "model.safetensors"], folder=tiny_blip_dir)
    bin_only_hub.discussions_error = AssertionError("pull requests are not looked at when main has safetensors")
    assert resolve_model_dir(BIN_ONLY_REPO, "blip") == tiny_blip_dir
    assert bin_only_hub.downloads == [("main", HUB_FILE_PATTERNS)]


def test_cached_hub_snapshot_is_used_without_asking_the_hub(bin_only_hub, tiny_blip_dir, monkeypatch):
    bin_only_hub.revisions["main"]["folder"] = tiny_blip_dir
    bin_only_hub.cached.add("main")
    monkeypatch.setattr(loading, "hub_is_reachable", lambda: pytest.fail("the hub was probed for a cached model"))
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: pytest.fail("the hub was asked for a cached model"))
    assert resolve_model_dir(BIN_ONLY_REPO, "blip") == tiny_blip_dir
    assert bin_only_hub.downloads == []


def test_a_model_larger_than_the_free_memory_is_refused_before_loading(tiny_blip_dir, monkeypatch):
    weights = sum(path.stat().st_size for path in tiny_blip_dir.glob("*.safetensors"))
    monkeypatch.setattr(loading, "available_memory_bytes", lambda: weights)  # less than weights x 1.3

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained must not run for a model that does not fit")

    monkeypatch.setattr(BlipExplainer.model_class, "from_pretrained", never)
    with pytest.raises(ModelUnavailableError) as refused:
        load_captioner(str(tiny_blip_dir), device="cpu")
    message = str(refused.value)
    assert f"{tiny_blip_dir.name} needs about" in message and "GB free" in message
    assert str(tiny_blip_dir.parent) not in message


def test_a_model_that_fits_loads(tiny_blip_dir, monkeypatch):
    monkeypatch.setattr(loading, "available_memory_bytes", lambda: 64 << 30)
    assert load_captioner(str(tiny_blip_dir), device="cpu").max_caption_tokens == 64


def test_a_hub_model_too_large_for_this_machine_is_refused_before_its_weights_download(
    bin_only_hub, tiny_blip_dir, conversion_cache, monkeypatch
):
    monkeypatch.setattr(loading, "available_memory_bytes", lambda: 1000)
    with pytest.raises(ModelUnavailableError, match=f"{BIN_ONLY_REPO} needs about .* GB free"):
        resolve_model_dir(BIN_ONLY_REPO, "blip")
    assert bin_only_hub.downloads == [], "nothing was downloaded"


def test_the_menu_offers_a_checkpoint_of_every_hub_family_and_the_demo():
    sources = [choice.captioner_source for choice in loading.model_choices()]
    assert sources == [
        loading.BLIP_BASE, loading.BLIP_LARGE, loading.FLORENCE2_BASE, loading.SMOLVLM_256M,
        loading.LLAVA_ONEVISION_05B, loading.QWEN2_VL_2B, loading.BLIP2_OPT_27B, loading.LLAVA_15_7B,
        loading.SHAPES_DEMO, loading.SHAPES_DEMO_DECODER,
    ]
    with_folder = loading.model_choices("/srv/models/my-smolvlm", None)
    assert with_folder[-1].label == "Local folder: my-smolvlm" and with_folder[-1].clip_source == loading.CLIP_BASE
