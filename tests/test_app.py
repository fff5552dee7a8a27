"""The app through Streamlit's AppTest, on the bundled shapes demo (offline, real model)."""

from __future__ import annotations

import html
import io
import json
import re
import zipfile

import imageio
import pytest
import streamlit as st

from app import VIDEO_FPS
from models.analysis import caption_image, measure_word
from models.explainer import Decoding
from models.families import load_captioner
from models.loading import SHAPES_DEMO_CHOICE
from tests.app_helpers import click, count_model_forwards, image_captions, pick_example, start_app, upload
from tests.tiny_models import build_markup_writing_blip, build_tiny_clip, save_tiny
from utils.shapes_world import generate_scene
from utils.text import escape_markdown

EXAMPLE_SEED = 99999  # media/examples/scene_99999_*.png, a held-out scene with two objects
SCENE = generate_scene(EXAMPLE_SEED)
EXAMPLE_NAME = f"scene_{EXAMPLE_SEED}_{SCENE.caption.replace(' ', '-')}.png"


DEMO_CAPTIONER = load_captioner("shapes-demo", device="cpu")
DEFAULT_METHOD = DEMO_CAPTIONER.default_method


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
    assert layer_slider.value == DEMO_CAPTIONER.default_layer(method)
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
    word = SCENE.caption.split().index(SCENE.objects[0].shape)
    app.session_state["word"] = word
    app.selectbox(key="method").set_value("occlusion").run()
    app.selectbox(key="metrics_fill").set_value("mean").run()
    app.button(key="measure").click().run()
    assert not app.exception, app.exception
    labels = {metric.label: metric.value for metric in app.metric}
    # The page shows what the library measures for the same word, map, fill and steps.
    image = SCENE.image.convert("RGB")
    caption = caption_image(DEMO_CAPTIONER, image, Decoding())
    (maps,) = DEMO_CAPTIONER.explain(image, caption, [word], method="occlusion")
    layer = DEMO_CAPTIONER.default_layer("occlusion")
    expected = measure_word(DEMO_CAPTIONER, image, caption, word, maps, layer, "mean", Decoding(), steps=16)
    assert float(labels["Deletion AUC (lower is better)"]) == pytest.approx(expected.curves.deletion.auc, abs=0.006)
    assert float(labels["Insertion AUC (higher is better)"]) == pytest.approx(expected.curves.insertion.auc, abs=0.006)
    assert labels["Most faithful layer"] == expected.layers.best_layer_name
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
    _, archive, page_html = app.session_state["report"]
    with zipfile.ZipFile(io.BytesIO(archive)) as report:
        names = report.namelist()
        captions = json.loads(report.read("captions.json"))
    assert {"original.png", "captions.json", "metrics.json", "layers.mp4", "report.html"} <= set(names)
    assert sum(name.startswith("heatmaps/") for name in names) >= 2
    assert captions["original"] == SCENE.caption
    assert SCENE.caption in page_html and "<script" not in page_html


def test_the_report_is_offered_only_for_what_the_page_still_shows():
    app = pick_example(start_app(), EXAMPLE_NAME)
    # Words whose pills read alike ("a · 99%" twice) are told apart by index in a browser, not
    # in AppTest, which picks the last of them on every rerun: choose a word named once.
    app.session_state["word"] = 2
    app.run()
    app.button(key="prepare_report").click().run()
    assert app.get("download_button"), "the report is offered once prepared"
    layer = app.select_slider(key=f"layer_{DEFAULT_METHOD}").value
    app.select_slider(key=f"layer_{DEFAULT_METHOD}").set_value(0).run()
    assert not app.get("download_button"), "a report of another layer is not offered"
    app.select_slider(key=f"layer_{DEFAULT_METHOD}").set_value(layer).run()
    assert app.get("download_button"), "back on the report's own selection, it is offered again"
    app.session_state["word"] = 3
    app.run()
    assert not app.get("download_button"), "a report of another word is not offered"
    app.session_state["word"] = 2
    app.run()
    assert app.get("download_button")
    click(app, 2, 2, SCENE.image.width, unix_time=1.0)
    click(app, 40, 40, SCENE.image.width, unix_time=2.0)
    app.button(key="regenerate").click().run()
    assert not app.get("download_button"), "a report without the masked region is not offered"


def test_the_first_heatmap_waits_for_the_chosen_word_alone(monkeypatch):
    requested = []
    family = type(DEMO_CAPTIONER)
    explain = family.explain

    def recording_explain(self, image, caption, word_indices=None, **options):
        requested.append(None if word_indices is None else list(word_indices))
        return explain(self, image, caption, word_indices, **options)

    monkeypatch.setattr(family, "explain", recording_explain)
    st.cache_data.clear()  # maps cached by earlier tests would hide the order of the work
    app = pick_example(start_app(), EXAMPLE_NAME)
    assert not app.exception, app.exception
    first = SCENE.caption.split().index(SCENE.objects[0].colour)  # "a blue circle ...": "blue"
    assert requested == [[first], None], "the chosen word alone first, then every word to fill in the rest"
    app.session_state["word"] = 2
    with count_model_forwards() as calls:
        app.run()
    assert calls[0] == 0, "once filled in, another word's maps are shown without running the model"
    word = SCENE.caption.split()[2]
    assert any(f"“{word}”" in caption.value for caption in app.caption)


def test_decoding_is_capped_at_the_models_position_limit():
    app = pick_example(start_app(), EXAMPLE_NAME)
    (tokens,) = [slider for slider in app.sidebar.slider if slider.label == "Max new tokens"]
    assert tokens.max == 31, "the demo's 32 positions, less BOS"
    tokens.set_value(31).run()
    app.sidebar.slider(key="num_beams").set_value(3).run()
    assert not app.exception, app.exception
    assert app.subheader[0].value == f"“{SCENE.caption}”"
    app.sidebar.text_input(key="prompt").set_value("a red circle and a blue square above the green triangle x").run()
    assert not app.exception, app.exception  # 58 characters: prompt and caption share the 32 positions
    app.sidebar.text_input(key="prompt").set_value("a " * 40).run()
    assert not app.exception, app.exception
    (error,) = app.error
    assert "leaving none for the caption" in error.value and "Shorten the prompt" in error.value
    app.sidebar.text_input(key="prompt").set_value("").run()
    assert app.subheader[0].value == f"“{SCENE.caption}”", "the image was kept"


@pytest.mark.parametrize(
    "value",
    [
        {"x": 10, "y": 10, "width": 0, "height": 420},
        {"x": 1e308, "y": 10, "width": 420, "height": 420},
        {"x": "10", "y": 10, "width": 420, "height": 420},
        {"x": float("nan"), "y": 10, "width": 420, "height": 420},
        {"x": 500, "y": 10, "width": 420, "height": 420},
        {"x": True, "y": 10, "width": 420, "height": 420},
        {"y": 10, "width": 420, "height": 420},
        "not a click",
    ],
)
def test_a_crafted_click_is_ignored(explained_app, value):
    app = explained_app
    app.button(key="reset_region").click().run()
    if isinstance(value, dict):
        value = {**value, "unix_time": 123.0 + len(repr(value))}
    app.session_state["region_clicks"] = value
    app.run()
    assert not app.exception, app.exception
    assert app.session_state["clicks"] == [] and app.session_state["region"] is None


def test_the_clip_sentence_is_shown_as_text_not_markup(explained_app):
    app = explained_app
    sentence = "**bold** [x](javascript:alert(1)) $x^2$ <b>tag</b>"
    (text_input,) = [box for box in app.text_input if box.label == "Sentence to check"]
    text_input.set_value(sentence).run()
    assert not app.exception, app.exception
    (clip_caption,) = [caption for caption in image_captions(app) if caption.startswith("CLIP ·")]
    assert clip_caption.split("“")[1].split("”")[0] == escape_markdown(sentence)


@pytest.fixture(scope="module")
def markup_app(tmp_path_factory):
    """The app on a captioner that writes only markup characters ("< * [ ` ..."), with a
    tiny CLIP, through the server's local-folder settings."""
    folder = tmp_path_factory.mktemp("markup")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLM_EXPLAINER_BLIP_DIR", str(save_tiny(*build_markup_writing_blip(), folder / "blip")))
        patch.setenv("VLM_EXPLAINER_CLIP_DIR", str(save_tiny(*build_tiny_clip(), folder / "clip")))
        app = start_app()
        local = next(label for label in app.sidebar.selectbox(key="model_label").options if label.startswith("Local"))
        app.sidebar.selectbox(key="model_label").set_value(local).run()
        pick_example(app, EXAMPLE_NAME)
        app.slider(key="auto_fraction").set_value(50).run()
        app.button(key="auto_region").click().run()
        app.button(key="regenerate").click().run()
        assert not app.exception, app.exception
        yield app


@pytest.mark.parametrize(
    "place",
    ["caption heading", "word pills", "heatmap caption", "region", "before and after", "captioner image caption"],
)
def test_model_words_are_shown_as_text_not_markup(markup_app, place):
    app = markup_app
    text = app.subheader[0].value.strip("“”")
    words = [option.content.split(" · ")[0] for option in app.button_group[0].proto.options]
    assert set("<>*[`#:~_$") & set(html.unescape(text)), "the model did write markup"
    shown = {
        "caption heading": [text],
        "word pills": words,
        "heatmap caption": [caption.value for caption in app.caption if " · score " in caption.value],
        "region": [markdown.value for markdown in app.markdown if markdown.value.startswith("Region:")],
        "before and after": [markdown.value for markdown in app.markdown if markdown.value.startswith("**")],
        "captioner image caption": [caption for caption in image_captions(app) if caption.startswith("Captioner ·")],
    }[place]
    assert shown, f"nothing found for {place}"
    for source in shown:
        for emphasis in ("**Before:** ", "**After:** "):
            source = source.replace(emphasis, "")
        assert "&#" in source, f"the {place} shows the words, escaped"
        raw = re.sub(r"&#\d+;", "", source)
        assert not set("<>*[]`#~_$") & set(raw), f"raw markup in the {place}: {source}"


def test_a_new_caption_starts_on_its_first_content_word():
    app = pick_example(start_app(), EXAMPLE_NAME)
    words = SCENE.caption.split()
    assert words[0] == "a"
    assert app.button_group[0].value == 1, "not on “a”"
    assert any(f"“{words[1]}” ·" in caption.value for caption in app.caption)


def test_a_photograph_on_the_demo_says_why_its_caption_is_poor():
    app = pick_example(start_app(), "photo_coffee.jpg")
    assert not app.exception, app.exception
    assert any("only ever seen synthetic scenes of coloured shapes" in notice.value for notice in app.info)
    assert not any("synthetic scenes" in notice.value for notice in pick_example(start_app(), EXAMPLE_NAME).info)


def test_a_sentence_longer_than_clip_reads_is_said_to_be_cut(explained_app):
    app = explained_app
    (text_input,) = [box for box in app.text_input if box.label == "Sentence to check"]
    text_input.set_value(" ".join(["a blue circle and a green square"] * 4)).run()
    assert not app.exception, app.exception
    (note,) = [caption.value for caption in app.caption if "was cut" in caption.value]
    assert note.startswith("CLIP reads at most 16 tokens, so the sentence was cut: CLIP saw “a blue circle")
    text_input.set_value("a blue circle").run()
    assert not any("was cut" in caption.value for caption in app.caption)


def test_the_captioner_runs_in_bfloat16_when_asked():
    app = pick_example(start_app(), EXAMPLE_NAME)
    app.sidebar.selectbox(key="precision_auto").set_value("bfloat16").run()
    assert not app.exception, app.exception
    assert app.subheader[0].value.startswith("“") and len(app.button_group) == 1
    assert len(app.get("image")) >= 1  # the heatmap overlay
