"""End to end in a real headless Chromium: upload, pick a word, click a box, regenerate.

Uses Debian's `chromium` (a test tool's own browser download cannot work on these machines),
driven by Playwright's Python package, against `streamlit run app.py` on a free local port.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from tests.app_helpers import DISPLAY_WIDTH
from utils.app_server import CHROMIUM_FLAGS, ROOT, chromium_executable, running_app, wait_idle
from utils.shapes_world import generate_scene

pytestmark = pytest.mark.browser

ARTIFACTS = ROOT / "tests" / "artifacts"
EXAMPLE_SEED = 99999
SCENE = generate_scene(EXAMPLE_SEED)
EXAMPLE_PATH = ROOT / "media" / "examples" / f"scene_{EXAMPLE_SEED}_{SCENE.caption.replace(' ', '-')}.png"


def chromium_path() -> str:
    """Debian's Chromium; in CI its absence is a failure, elsewhere a skip."""
    path = chromium_executable()
    if path is None:
        message = "Debian's chromium is not installed (make test installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def app_url() -> Iterator[str]:
    """`streamlit run app.py` on a free port, offline, until the module's tests end."""
    with running_app() as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def click_image(page, x_image: float, y_image: float) -> None:
    """Click the region component (an iframe) at a point in original image pixels."""
    frame = page.frame_locator('iframe[title*="streamlit_image_coordinates"]')
    scale = DISPLAY_WIDTH / SCENE.image.width
    frame.locator("img").click(position={"x": x_image * scale, "y": y_image * scale})
    wait_idle(page)


def test_upload_click_word_box_regenerate(app_url, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    page.goto(app_url)
    wait_idle(page)
    expect(page.get_by_text("Showing the bundled demo instead")).to_be_visible()

    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(EXAMPLE_PATH))
    wait_idle(page)
    expect(page.get_by_role("heading", name=f"“{SCENE.caption}”")).to_be_visible(timeout=120_000)

    target = SCENE.objects[0]
    words = SCENE.caption.split()
    shape_index = words.index(target.shape)
    page.locator('[data-testid="stButtonGroup"] button').nth(shape_index).click()
    wait_idle(page)
    expect(page.get_by_text(f"“{target.shape}” ·").first).to_be_visible()

    x0, y0, x1, y1 = target.box
    click_image(page, x0 - 1, y0 - 1)
    click_image(page, x1, y1)
    expect(page.get_by_text("Region: rectangle")).to_be_visible()

    page.get_by_role("button", name="Mask and regenerate").click()
    wait_idle(page)
    after = page.get_by_text("After:").locator("..")
    expect(after).to_be_visible(timeout=120_000)
    new_caption = after.inner_text().split("After:")[1].strip()
    assert new_caption and target.shape not in new_caption.split(), new_caption
    expect(page.get_by_text("Removed:")).to_contain_text(target.shape)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
    page.close()


def test_several_pages_at_once_each_get_their_own_caption(app_url, browser):
    """Three browser sessions upload different scenes at the same moment; the one cached model
    serves them all, and each page shows its own scene's caption."""
    from playwright.sync_api import expect

    examples = sorted((ROOT / "media" / "examples").glob("scene_*.png"))[:3]
    pages = []
    for path in examples:
        context = browser.new_context(viewport={"width": 1200, "height": 900})  # one session each
        page = context.new_page()
        page.goto(app_url)
        wait_idle(page)
        pages.append((page, path))
    for page, path in pages:  # no waiting in between: the server runs the three scripts at once
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))
    for page, path in pages:
        seed = int(path.name.split("_")[1])
        expect(page.get_by_role("heading", name=f"“{generate_scene(seed).caption}”")).to_be_visible(timeout=120_000)
        expect(page.locator('[data-testid="stException"]')).to_have_count(0)
        page.context.close()


@pytest.fixture
def explained_page(app_url, browser):
    """A fresh session on the example scene, captioned and explained."""
    from playwright.sync_api import expect

    page = browser.new_context(viewport={"width": 1400, "height": 2400}).new_page()
    page.goto(app_url)
    wait_idle(page)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(EXAMPLE_PATH))
    wait_idle(page)
    expect(page.get_by_role("heading", name=f"“{SCENE.caption}”")).to_be_visible(timeout=120_000)
    yield page
    page.context.close()


def slider(page, label: str):
    return page.locator('[data-testid="stSlider"]').filter(has_text=label).get_by_role("slider")


def test_a_sentence_with_markup_is_shown_as_written(explained_page):
    from playwright.sync_api import expect

    page = explained_page
    sentence = "**bold** [x](javascript:alert(1)) $x$ <b>tag</b>"
    box = page.get_by_label("Sentence to check")
    box.fill(sentence)
    box.press("Enter")
    wait_idle(page)
    caption = page.locator('[data-testid="stImageCaption"]').filter(has_text="CLIP ·")
    expect(caption).to_contain_text(f"“{sentence}”")
    assert caption.locator("strong, a, b, .katex").count() == 0, caption.inner_html()


def test_the_longest_generation_and_a_too_long_prompt_keep_the_page(explained_page):
    from playwright.sync_api import expect

    page = explained_page
    tokens = slider(page, "Max new tokens")
    tokens.focus()
    tokens.press("End")
    wait_idle(page)
    expect(tokens).to_have_attribute("max", "31")  # the demo's 32 positions, less BOS
    expect(tokens).to_have_value("31")
    prompt = page.get_by_role("textbox", name="Prompt (conditional captioning)")
    prompt.fill("a red circle and a blue square above the green triangle x")
    prompt.press("Enter")
    wait_idle(page)
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)
    prompt.fill("a " * 40)
    prompt.press("Enter")
    wait_idle(page)
    expect(page.get_by_text("leaving none for the caption")).to_be_visible()
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)
    prompt.fill("")
    prompt.press("Enter")
    wait_idle(page)
    expect(page.get_by_role("heading", name=f"“{SCENE.caption}”")).to_be_visible(timeout=120_000)


def test_a_crafted_click_message_is_ignored(explained_page):
    """What a page script could send in place of the image component: the server ignores it."""
    from playwright.sync_api import expect

    page = explained_page

    def send(value: str) -> None:
        # The component's frame afresh each time: a sound first corner redraws the image, and
        # the frame that drew it is detached.
        frame = page.locator('iframe[title*="streamlit_image_coordinates"]').element_handle().content_frame()
        frame.evaluate(
            "value => window.parent.postMessage({isStreamlitMessage: true, type: 'streamlit:setComponentValue',"
            " value: value, dataType: 'json'}, '*')",
            page.evaluate(f"() => ({value})"),
        )
        wait_idle(page)

    region = page.get_by_text(re.compile(r"^Region: "))
    for value in ["{x: 1e308, y: 5, width: 420, height: 420, unix_time: 1}",
                  "{x: 5, y: 5, width: 0, height: 420, unix_time: 2}",
                  "{x: 'five', y: 5, width: 420, height: 420, unix_time: 3}",
                  "{x: 5, y: 5, width: 420, height: 420, unix_time: 4}",
                  "{x: 5, y: 5, height: 420, unix_time: 5}"]:
        send(value)
        expect(page.locator('[data-testid="stException"]')).to_have_count(0)
    expect(region).to_have_count(0)
    send("{x: 200, y: 200, width: 420, height: 420, unix_time: 6}")  # the same channel, a sound click
    expect(region).to_contain_text("rectangle")
    expect(page.get_by_role("heading", name=f"“{SCENE.caption}”")).to_be_visible()


def test_the_panels_below_follow_a_layer_chosen_in_the_heatmap_section(explained_page):
    """The layer slider sits in a fragment; the CLIP panel below shows the captioner's map of
    the chosen layer beside CLIP's, and must follow it."""
    from playwright.sync_api import expect

    page = explained_page
    captioner_caption = page.locator('[data-testid="stImageCaption"]').filter(has_text="Captioner ·")
    expect(captioner_caption).to_contain_text("mean of all 3 layers")
    layer = slider(page, "Layer (shallow → deep)")
    layer.focus()
    layer.press("Home")
    wait_idle(page)
    expect(page.get_by_text("decoder cross-attention 1/3 · score")).to_be_visible()
    expect(captioner_caption).to_contain_text("decoder cross-attention 1/3")
    page.get_by_role("button", name="Prepare report").click()
    wait_idle(page)
    expect(page.get_by_role("button", name="Download report (ZIP)")).to_be_visible()
    layer.focus()
    layer.press("End")
    wait_idle(page)
    expect(captioner_caption).to_contain_text("mean of all 3 layers")
    expect(page.get_by_role("button", name="Download report (ZIP)")).to_have_count(0)
