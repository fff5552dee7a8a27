"""Model sources: local folders, safetensors only, and a hub that does not answer."""

from __future__ import annotations

import json
import socket
import time

import pytest

from models.blip_explainer import BlipExplainer
from models.loading import ModelUnavailableError, resolve_model_dir

NOT_CACHED = "vlm-explainer-tests/not-a-cached-model"


def test_local_folder_loads_through_from_pretrained(tiny_blip_dir):
    explainer = BlipExplainer.from_pretrained(str(tiny_blip_dir), device="cpu")
    assert explainer.geometry.grid_shape == (4, 4)
    assert not any(parameter.requires_grad for parameter in explainer.model.parameters())


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelUnavailableError, match="config.json"):
        resolve_model_dir(str(tmp_path), "blip")


def test_folder_with_pickled_weights_only_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(ModelUnavailableError, match="safetensors"):
        resolve_model_dir(str(tmp_path), "blip")


def test_broken_folder_gives_one_clear_error(tmp_path, tiny_blip_dir):
    for item in tiny_blip_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelUnavailableError, match="could not be loaded"):
        BlipExplainer.from_pretrained(str(tmp_path), device="cpu")


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
