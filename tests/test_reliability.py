"""The app shared by a team: bad uploads, concurrent sessions, no hub, long sessions, security."""

from __future__ import annotations

import gc
import re
import socket
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models.analysis import Decoding, caption_image, mask_and_recaption
from models.blip_explainer import BlipExplainer
from models.clip_explainer import ClipExplainer
from tests.app_helpers import click, pick_example, resident_mb, start_app, upload
from tests.bad_images import bad_image_cases
from utils.image_utils import load_image
from utils.patch_utils import Box
from utils.shapes_world import generate_scene

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(path.name for path in (ROOT / "media" / "examples").glob("*.png"))
FIRST_EXAMPLE_SEED = 99999
FIRST_SCENE = generate_scene(FIRST_EXAMPLE_SEED)
FIRST_EXAMPLE = f"scene_{FIRST_EXAMPLE_SEED}_{FIRST_SCENE.caption.replace(' ', '-')}.png"


def forward_hook_count() -> int:
    """Forward hooks on every module of every explainer alive in this process."""
    explainers = [item for item in gc.get_objects() if isinstance(item, BlipExplainer | ClipExplainer)]
    return sum(len(module._forward_hooks) for item in explainers for module in item.model.modules())


# ---------------------------------------------------------------- 1. bad inputs


@pytest.fixture(scope="module")
def app_with_region():
    """A session with an image, a caption and a region, to check that bad uploads keep them."""
    app = pick_example(start_app(), FIRST_EXAMPLE)
    click(app, 2, 2, FIRST_SCENE.image.width, unix_time=1.0)
    click(app, 30, 30, FIRST_SCENE.image.width, unix_time=2.0)
    return app


REFUSED = [case for case in bad_image_cases() if case.expect_error]
ACCEPTED = [case for case in bad_image_cases() if not case.expect_error]


@pytest.mark.parametrize("case", REFUSED, ids=lambda case: case.name)
def test_bad_upload_gets_one_clear_message_and_the_session_keeps_its_state(app_with_region, case):
    app = app_with_region
    caption_before, region_before = app.subheader[0].value, app.session_state["region"]
    upload(app, case.file_name, case.data)
    assert not app.exception, "no traceback reaches the page"
    errors = [error.value for error in app.error]
    assert len(errors) == 1 and case.message_contains in errors[0].lower(), errors
    assert app.subheader[0].value == caption_before
    assert app.session_state["region"] == region_before


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda case: case.name)
def test_awkward_but_valid_upload_is_captioned(case):
    app = upload(start_app(), case.file_name, case.data)
    assert not app.exception
    assert not app.error
    assert app.subheader and app.subheader[0].value.startswith("“")


# ---------------------------------------------------------------- 2. concurrency


@pytest.fixture(scope="module")
def shared_demo() -> BlipExplainer:
    """One demo model for every thread, as st.cache_resource shares it between sessions."""
    return BlipExplainer.from_pretrained("shapes-demo", device="cpu")


def session_work(blip: BlipExplainer, name: str, word: int) -> tuple:
    """What one browser session asks of the shared model: caption, every map, the causal test."""
    image = load_image((ROOT / "media" / "examples" / name).read_bytes())
    caption = caption_image(blip, image, Decoding())
    maps = blip.explain(image, caption, method=BlipExplainer.default_method)[word]
    masked = mask_and_recaption(blip, image, caption, [Box(0, 0, 48, 48)], "mean", Decoding())
    return caption.text, maps.score, maps.cam_patches.tobytes(), masked.caption.text, masked.log_prob_change.tobytes()


def test_four_sessions_at_once_get_what_they_get_alone(shared_demo):
    """AppTest itself is not thread-safe (it flips global options per run), so the sessions'
    model work runs here in threads on one shared model; tests/test_browser.py runs real
    concurrent browser sessions against one server."""
    jobs = [(EXAMPLES[index], index % 3 + 1) for index in range(4)]
    alone = [session_work(shared_demo, name, word) for name, word in jobs]
    memory_before = resident_mb()
    barrier = threading.Barrier(len(jobs))

    def together(job: tuple[str, int]) -> tuple:
        barrier.wait()  # start at the same moment so the forward passes overlap
        return session_work(shared_demo, *job)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(together, jobs))
    assert results == alone
    growth = resident_mb() - memory_before
    print(f"resident memory growth for 4 concurrent sessions: {growth:.0f} MB")
    assert growth < 500


# ---------------------------------------------------------------- 3. no hub


def test_without_network_the_app_starts_on_the_demo_within_ten_seconds(monkeypatch):
    """HF_HUB_OFFLINE unset, and a hub that accepts connections but never answers."""
    with socket.socket() as silent_hub:
        silent_hub.bind(("127.0.0.1", 0))
        silent_hub.listen(1)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent_hub.getsockname()[1]}")
        started = time.monotonic()
        app = start_app()
        elapsed = time.monotonic() - started
    assert not app.exception
    assert elapsed < 10, f"start-up took {elapsed:.1f} s"
    assert any("did not answer" in notice.value for notice in app.sidebar.info)


def test_a_broken_local_model_folder_gives_a_clear_message(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("VLM_EXPLAINER_BLIP_DIR", str(tmp_path))
    app = start_app()
    local = next(option for option in app.sidebar.selectbox(key="model_label").options if option.startswith("Local"))
    app.sidebar.selectbox(key="model_label").set_value(local).run()
    assert not app.exception
    assert any("safetensors" in notice.value for notice in app.sidebar.info)


# ---------------------------------------------------------------- 4. long sessions


def test_two_hundred_interactions_keep_memory_and_hooks_bounded():
    app = pick_example(start_app(), FIRST_EXAMPLE)
    words = len(FIRST_SCENE.caption.split())
    layer_slider = f"layer_{app.selectbox(key='method').value}"
    layer_count = len(app.select_slider(key=layer_slider).options)

    def interact(step: int) -> None:
        if step % 3 == 0:
            app.session_state["word"] = step % words
        elif step % 3 == 1:
            app.select_slider(key=layer_slider).set_value(step % layer_count)
        else:
            app.slider(key="opacity").set_value(round((step % 10) / 10, 1))
        app.run()
        assert not app.exception

    for step in range(20):  # warm-up: caches, allocator, transformers' own hooks
        interact(step)
    memory_after_warm_up, hooks_after_warm_up = resident_mb(), forward_hook_count()
    for step in range(20, 200):
        interact(step)
    growth = (resident_mb() - memory_after_warm_up) / memory_after_warm_up
    print(f"resident memory growth over 180 interactions: {growth:.1%}")
    assert growth <= 0.10
    assert forward_hook_count() == hooks_after_warm_up


# ---------------------------------------------------------------- 5. security


def test_uploads_are_capped_in_the_server_config():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert 0 < config["server"]["maxUploadSize"] <= 50


def test_weights_never_go_through_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must never run: weights load from safetensors only")

    monkeypatch.setattr(torch, "load", refuse)
    blip = BlipExplainer.from_pretrained("shapes-demo", device="cpu")
    caption = blip.caption(FIRST_SCENE.image)
    assert blip.explain(FIRST_SCENE.image, caption, [0])
    ClipExplainer.from_pretrained("shapes-demo", device="cpu").similarity(FIRST_SCENE.image, [caption.text])


def test_no_remote_code_and_no_model_path_from_the_browser():
    sources = [path for path in ROOT.rglob("*.py") if ".venv" not in path.parts and "tests" not in path.parts]
    for path in sources:
        text = path.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
    app = start_app()
    prompts = [widget.label for widget in app.sidebar.text_input]
    assert prompts == ["Prompt (conditional captioning)"], "no text box may name a model folder"


def test_user_text_never_becomes_html_on_the_page():
    hostile = "<img src=x onerror=alert(1)>"
    app = upload(start_app(), f"{hostile}.png", b"not an image")
    (message,) = [error.value for error in app.error]
    assert "onerror" in message, "the file name is shown, as text"
    assert not re.search(r"(?<!\\)[<>\[\]]", message), f"markup characters must be escaped: {message}"
