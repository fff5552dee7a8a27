"""The app through Streamlit's AppTest, on the bundled shapes demo (offline, real model)."""

from __future__ import annotations

import io
import json
import zipfile

import imageio
import pytest

from app import VIDEO_FPS
from models.blip_explainer import DEFAULT_METHOD, BlipExplainer
from models.loading import SHAPES_DEMO_CHOICE
from tests.app_helpers import click, count_model_forwards, pick_example, start_app, upload
from utils.shapes_world import generate_scene

EXAMPLE_SEED = 99999  # media/examples/scene_99999_*.png, a held-out scene with two objects
SCENE = generate_scene(EXAMPLE_SEED)
EXAMPLE_NAME = f"scene_{EXAMPLE_SEED}_{SCENE.caption.replace(' ', '-')}.png"


def app_blip() -> BlipExplainer:
    return BlipExplainer.from_pretrained("shapes-demo", device="cpu")


@pytest.fixture(scope="module")
def explained_app():
    """The app after picking the example scene: captioned, a word chosen, maps shown."""
    app = start_app()
    pick_example(app, EXAMPLE_NAME)
    assert not app.exception, app.exception
    return app


def test_offline_start_falls_back_to_the_demo_with_a_notice():
    app = start_app()
    assert not app.exception
    assert app.sidebar.selectbox(key="model_label").value == SHAPES_DEMO_CHOICE.label
    assert any("unavailable" in notice.value and "demo" in notice.value for notice in app.sidebar.info)
    assert any("Upload an image" in message.value for message in app.info)


def test_example_is_captioned_and_explained(explained_app):
    app = explained_app
    assert app.subheader[0].value == f"“{SCENE.caption}”"
    assert len(app.button_group) == 1  # the word pills
    method = app.selectbox(key="method").value
    assert method == DEFAULT_METHOD
    layer_slider = app.select_slider(key=f"layer_{method}")
    assert layer_slider.value == app_blip().default_layer(method)
    assert len(app.get("image")) >= 1  # the heatmap overlay


def test_rerun_that_changes_nothing_runs_no_model(explained_app):
    with count_model_forwards() as calls:
        explained_app.run()
    assert calls[0] == 0
    with count_model_forwards() as calls:
        explained_app.select_slider(key=f"layer_{DEFAULT_METHOD}").set_value(0).run()
    assert calls[0] == 0, "changing the layer only redraws cached maps"


def test_changing_the_word_shows_that_words_map(explained_app):
    app = explained_app
    app.session_state["word"] = 3
    app.run()
    assert not app.exception
    word = SCENE.caption.split()[3]
    assert any(f"“{word}”" in caption.value for caption in app.caption)


def test_two_clicks_make_a_box_and_the_masked_object_disappears():
    app = pick_example(start_app(), EXAMPLE_NAME)
    target = SCENE.objects[0]
    x0, y0, x1, y1 = target.box
    width = SCENE.image.width
    click(app, x0 - 1, y0 - 1, width, unix_time=1.0)
    assert len(app.session_state["clicks"]) == 1 and app.session_state["region"] is None
    app.run()  # the component repeats its last click on every rerun: no new point
    assert len(app.session_state["clicks"]) == 1
    click(app, x1, y1, width, unix_time=2.0)
    description, boxes = app.session_state["region"]
    (box,) = boxes
    assert box.x0 <= x0 and box.y0 <= y0 and box.x1 >= x1 and box.y1 >= y1
    app.selectbox(key="fill").set_value("mean").run()
    app.button(key="regenerate").click().run()
    assert not app.exception, app.exception
    removed = " ".join(message.value for message in app.success)
    assert target.shape in removed, f"masking the {target.colour} {target.shape} should remove its word"
    after = next(markdown.value for markdown in app.markdown if markdown.value.startswith("**After:**"))
    assert target.shape not in after.split("**After:**")[1]
    labels = [metric.label for metric in app.metric]
    assert any("masked image · new caption" in label for label in labels)
    app.button(key="reset_region").click().run()
    assert app.session_state["region"] is None and app.session_state["clicks"] == []


def test_auto_region_masks_the_top_patches(explained_app):
    app = explained_app
    app.slider(key="auto_fraction").set_value(5).run()
    app.button(key="auto_region").click().run()
    description, boxes = app.session_state["region"]
    assert description.startswith("top 5%") and len(boxes) >= 1


def test_video_builds_and_decodes(explained_app, tmp_path):
    app = explained_app
    app.button(key="build_video").click().run()
    assert not app.exception
    path = tmp_path / "layers.mp4"
    path.write_bytes(app.session_state["video"][1])
    with imageio.get_reader(path, format="FFMPEG") as reader:
        frame_count = sum(1 for _ in reader)
    layers = len(app.select_slider(key=f"layer_{app.selectbox(key='method').value}").options)
    assert frame_count == layers * VIDEO_FPS + (layers - 1) * (VIDEO_FPS // 3)


def test_a_bad_upload_is_refused_and_the_session_keeps_its_state():
    app = pick_example(start_app(), EXAMPLE_NAME)
    click(app, 2, 2, SCENE.image.width, unix_time=1.0)
    click(app, 40, 40, SCENE.image.width, unix_time=2.0)
    region_before = app.session_state["region"]
    upload(app, "holiday.jpg", b"this is a text file, not a picture")
    assert not app.exception
    assert any("holiday" in error.value and "previous image is kept" in error.value for error in app.error)
    assert app.subheader[0].value == f"“{SCENE.caption}”"
    assert app.session_state["region"] == region_before


def test_metrics_panel_measures_the_word_and_offers_the_minimal_region(explained_app):
    app = explained_app
    app.session_state["word"] = SCENE.caption.split().index(SCENE.objects[0].shape)
    app.selectbox(key="method").set_value("occlusion").run()
    app.selectbox(key="metrics_fill").set_value("mean").run()
    app.button(key="measure").click().run()
    assert not app.exception, app.exception
    labels = {metric.label: metric.value for metric in app.metric}
    deletion = float(labels["Deletion AUC (lower is better)"])
    assert 0 <= deletion <= 1.5
    assert labels["Most faithful layer"]
    app.button(key="sanity").click().run()
    assert not app.exception
    assert any("Rank correlation" in message.value for message in [*app.success, *app.warning])
    app.button(key="use_minimal_region").click().run()
    assert app.session_state["region"][0].startswith("minimal removing region")
    assert any("Removed:" in message.value for message in app.success)


def test_report_holds_images_captions_metrics_and_video(explained_app):
    app = explained_app
    app.button(key="build_video").click().run()
    app.button(key="prepare_report").click().run()
    assert not app.exception, app.exception
    archive, page_html = app.session_state["report"]
    with zipfile.ZipFile(io.BytesIO(archive)) as report:
        names = report.namelist()
        captions = json.loads(report.read("captions.json"))
    assert {"original.png", "captions.json", "metrics.json", "layers.mp4", "report.html"} <= set(names)
    assert sum(name.startswith("heatmaps/") for name in names) >= 2
    assert captions["original"] == SCENE.caption
    assert SCENE.caption in page_html and "<script" not in page_html
