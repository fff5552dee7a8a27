"""The whole page on every family with a tiny folder, through a server-side folder (offline)."""

from __future__ import annotations

import pytest

from models.families import captioner_family
from tests.app_helpers import click, pick_example, start_app
from tests.tiny_families import TINY_FAMILIES, save_family
from utils.shapes_world import generate_scene

EXAMPLE_SEED = 99999
SCENE = generate_scene(EXAMPLE_SEED)
EXAMPLE_NAME = f"scene_{EXAMPLE_SEED}_{SCENE.caption.replace(' ', '-')}.png"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_caption_heatmap_causal_test_metrics_video_and_report_work_for_the_family(family, tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_EXPLAINER_CAPTIONER_DIR", str(save_family(family, tmp_path / family)))
    app = start_app()
    local = next(label for label in app.sidebar.selectbox(key="model_label").options if label.startswith("Local"))
    app.sidebar.selectbox(key="model_label").set_value(local).run()
    assert not app.exception, app.exception
    explainer_class = captioner_family(family)
    # A task is chosen from a list (Florence-2); an instruction or a caption's start is typed.
    if explainer_class.prompt_choices:
        prompt_widget = app.sidebar.selectbox(key="prompt_choice")
        assert list(prompt_widget.options) == list(explainer_class.prompt_choices) and not app.sidebar.text_input
    else:
        prompt_widget = app.sidebar.text_input(key="prompt")
    assert prompt_widget.label == explainer_class.prompt_label
    pick_example(app, EXAMPLE_NAME)
    assert not app.exception, app.exception
    assert app.selectbox(key="method").value == explainer_class.default_method
    assert "Describe this image" not in app.subheader[0].value, "the caption is the answer, not the question"
    assert len(app.button_group) == 1 and app.button_group[0].options, "the answer's words are offered"
    click(app, 2, 2, SCENE.image.width, unix_time=1.0)
    click(app, 60, 60, SCENE.image.width, unix_time=2.0)
    app.button(key="regenerate").click().run()
    assert not app.exception, app.exception
    assert any(markdown.value.startswith("**After:**") for markdown in app.markdown)
    app.button(key="measure").click().run()
    app.button(key="build_video").click().run()
    app.button(key="prepare_report").click().run()
    assert not app.exception, app.exception
    assert app.session_state["video"] is not None and app.session_state["report"] is not None
