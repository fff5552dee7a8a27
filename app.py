"""VLM Explainer: see why a vision-language model wrote each word of its caption.

This script is layout and session state only. Every computation lives in models/ (anything
that runs a model) or utils/ (pure helpers); results come back as plain dataclasses.
Model work is cached on a hash of the image bytes, so a rerun that changes nothing runs no
model, and one cached model serves every browser session.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import streamlit as st
from PIL import Image
from streamlit_image_coordinates import streamlit_image_coordinates

from models.analysis import (
    LANGUAGE_PRIOR_NATS,
    MaskedCaption,
    WordEvidence,
    WordFaithfulness,
    WorkKey,
    caption_image,
    mask_and_recaption,
    measure_word,
    sanity_check,
    word_evidence,
)
from models.clip_explainer import ClipExplainer, ClipMap, Similarity
from models.explainer import (
    Caption,
    CaptionerExplainer,
    Decoding,
    ExplanationTooLargeError,
    PromptTooLongError,
    WordMaps,
)
from models.families import load_captioner
from models.loading import (
    PRECISIONS,
    SHAPES_DEMO_CHOICE,
    ModelChoice,
    ModelUnavailableError,
    local_model_dirs,
    model_choices,
)
from utils.allocator import return_large_buffers
from utils.caption_diff import diff_html
from utils.image_utils import (
    COUNTERFACTUAL_NAMES,
    COUNTERFACTUALS,
    EXAMPLES_DIR,
    ImageLoadError,
    WorkingImage,
    colormap_names,
    draw_box,
    draw_grid,
    draw_marker,
    example_names,
    finite_range,
    fit_for_display,
    load_working_image,
    overlay_heatmap,
)
from utils.metrics import SanityCheck
from utils.patch_utils import FILL_MODES, Box, box_from_corners, click_to_image, top_patches
from utils.plots import curves_figure, log_prob_change_figure
from utils.report import ReportContent, report_html, report_zip
from utils.text import RELIANCE_BARS, RELIANCE_FULL_BAR_NATS, escape_markdown, first_content_word, reliance_mark
from utils.video_utils import encode_mp4, layer_frames

DISPLAY_WIDTH = 420  # pixels of each image column on the page
DISPLAY_MAX_SIDE = 1024  # overlays are drawn on a copy no larger than this
VIDEO_FPS = 12
MAX_NEW_TOKENS = 60  # the decoding slider's end, or the model's own limit when lower
REGION_COLOUR = (255, 64, 160)
# Mean colour shifts the input distribution least of the fills (the demo never saw black squares).
DEFAULT_FILL = "mean"
# Uploads: the file size checked here (Streamlit's own, larger cap in .streamlit/config.toml
# refuses beyond it in the browser) and the pixel count checked by load_image's header read.
UPLOAD_MAX_MB = 20
UPLOAD_LIMITS_TEXT = (
    f"Up to {UPLOAD_MAX_MB} MB and 50 megapixels. The models see at most a few hundred pixels "
    "a side, and the server is shared: larger files would only cost everyone memory."
)


# ---------------------------------------------------------------- cached model work


@st.cache_resource(show_spinner=False, max_entries=4)
def load_captioner_cached(source: str, device: str, precision: str, _on_progress=None) -> CaptionerExplainer:
    return load_captioner(source, device, _on_progress, precision)


@st.cache_resource(show_spinner=False, max_entries=4)
def load_clip(source: str, device: str, _on_progress=None) -> ClipExplainer:
    return ClipExplainer.from_pretrained(source, device, _on_progress)


# Cached functions hash a WorkKey and their own request, each by its repr (every field is a
# plain value); their underscored arguments are the objects the key names, and are not hashed.
HASH_FUNCS = {WorkKey: repr, Decoding: repr, Box: repr}


def cached(max_entries: int, spinner: str | bool = False):
    return st.cache_data(max_entries=max_entries, show_spinner=spinner, hash_funcs=HASH_FUNCS)


@cached(64, "Captioning…")
def cached_caption(key: WorkKey, decoding: Decoding, _captioner: CaptionerExplainer, _image: Image.Image) -> Caption:
    return caption_image(_captioner, _image, decoding)


@cached(64)
def cached_word_evidence(key: WorkKey, counterfactual: str, _captioner, _image, _caption: Caption) -> WordEvidence:
    return word_evidence(_captioner, _image, _caption, counterfactual)


@cached(64, "Explaining the word at every layer…")
def cached_one_word_maps(key: WorkKey, method: str, word: int, _captioner, _image, _caption) -> WordMaps:
    (maps,) = _captioner.explain(_image, _caption, [word], method=method)
    return maps


@cached(64, "Explaining the other words, so that choosing one is instant…")
def cached_word_maps(key: WorkKey, method: str, _captioner, _image, _caption) -> list[WordMaps]:
    return _captioner.explain(_image, _caption, method=method)


def masked_caption(page: Page, boxes: tuple[Box, ...], fill: str) -> tuple[MaskedCaption, Image.Image]:
    """The causal test's result and its masked image at display size, kept in the session: the
    result holds two working-size images, and a session shows one region at a time, so only the
    latest is kept, and it goes with the session."""
    key = (page.key, boxes, fill, page.decoding)
    if st.session_state.masked is None or st.session_state.masked[0] != key:
        with st.spinner("Masking and captioning again…"):
            result = mask_and_recaption(page.captioner, page.image, page.caption, boxes, fill, page.decoding)
        st.session_state.masked = (key, result, fit_for_display(result.masked_image, DISPLAY_MAX_SIDE))
    _, result, shown = st.session_state.masked
    return result, shown


@cached(16, "Measuring: masked images are scored in batches…")
def cached_word_faithfulness(
    key: WorkKey, word: int, method: str, layer: int, fill: str, steps: int, decoding: Decoding,
    _captioner, _image, _caption, _maps: WordMaps,
) -> WordFaithfulness:
    return measure_word(_captioner, _image, _caption, word, _maps, layer, fill, decoding, steps)


@cached(16, "Re-randomising the top vision layers of a copy of the model…")
def cached_sanity_check(key: WorkKey, word: int, method: str, layer: int, _captioner, _image, _caption) -> SanityCheck:
    return sanity_check(_captioner, _image, _caption, word, method, layer)


@cached(128)
def cached_similarity(key: WorkKey, texts: tuple[str, ...], _clip, _image) -> Similarity:
    return _clip.similarity(_image, list(texts))


@cached(64, "CLIP Grad-CAM…")
def cached_clip_map(key: WorkKey, text: str, layer: int, _clip, _image) -> ClipMap:
    return _clip.explain(_image, text, layer)


@dataclass(frozen=True)
class Page:
    """What every section of one script run works on, with the cache keys that name it."""

    captioner: CaptionerExplainer
    clip: ClipExplainer | None
    key: WorkKey  # the captioner, the image and the caption
    clip_model_key: str
    working: WorkingImage  # the upload as decoded once: every model works on its copy
    display_image: Image.Image  # the image scaled down for the page; overlays are drawn on it
    caption: Caption
    decoding: Decoding
    demo: bool  # the bundled shapes demo, not a real captioner
    counterfactual: str  # the image that stands for "no image" in each word's visual reliance

    @property
    def image(self) -> Image.Image:
        return self.working.image

    @property
    def clip_key(self) -> WorkKey:
        return WorkKey(self.clip_model_key, self.key.image)

    def word_maps(self, method: str, word: int) -> WordMaps:
        """One word's maps for a method. Until every word's maps are filled in (at the end of
        the run that first shows them), the word is explained alone, so the first heatmap waits
        for one gradient, not one per word."""
        if (self.key, method) in st.session_state.filled_word_maps:
            return self.all_word_maps(method)[word]
        return cached_one_word_maps(self.key, method, word, self.captioner, self.image, self.caption)

    def evidence(self) -> WordEvidence:
        """Every word's probability and visual reliance (one batched pass, cached)."""
        return cached_word_evidence(self.key, self.counterfactual, self.captioner, self.image, self.caption)

    def all_word_maps(self, method: str) -> list[WordMaps]:
        """Every caption word's maps for a method, in one forward pass and one gradient per word."""
        return cached_word_maps(self.key, method, self.captioner, self.image, self.caption)

    def display_geometry(self, explainer: CaptionerExplainer | ClipExplainer):
        """Where an explainer's patches lie on the displayed image."""
        return explainer.image_geometry(self.display_image.size)

    def heat_images(self, maps: WordMaps):
        """(layers, H, W) heatmaps on the displayed image, and their common value range."""
        heat = self.display_geometry(self.captioner).cams_to_image(maps.cam_patches)
        return heat, finite_range(heat)

    def patch_boxes(self, patch_ids) -> tuple[Box, ...]:
        """The original image's pixels under each of the captioner's patches."""
        geometry = self.captioner.image_geometry(self.image.size)
        return tuple(geometry.patch_box_image(patch_id) for patch_id in patch_ids)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- session state


def init_state() -> None:
    """Session keys, initialised once per browser session."""
    defaults = {
        "working": None,  # WorkingImage of the accepted upload or example
        "display_image": None,  # its copy for the page, at most DISPLAY_MAX_SIDE
        "image_name": "",
        "last_upload_id": None,
        "last_example": None,
        "clicks": [],  # region corners in pixels of the working copy
        "last_click_time": None,  # the click component repeats its last value on every rerun
        "region": None,  # (description, tuple of Box in working-copy pixels) or None
        "masked_request": None,  # region key + fill the user asked to regenerate
        "masked": None,  # (key, MaskedCaption, its masked image at display size) of the latest causal test
        "video": None,  # (key, mp4 bytes)
        "report": None,  # (key, zip bytes, html text), prepared on request
        "filled_word_maps": set(),  # (WorkKey, method) of maps computed for every word
        "word_caption": None,  # the caption ids the word pills were last drawn for
        "metrics_request": None,  # what "Measure faithfulness" was pressed for
        "sanity_request": None,  # what "Sanity check" was pressed for
        "model_notice": "",
        "pending_model_label": None,  # the demo, when the chosen model failed to load
    }
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)
    # A model fallback picked on the last run must be applied before the widget is drawn.
    if st.session_state.pending_model_label:
        st.session_state.model_label = st.session_state.pending_model_label
        st.session_state.pending_model_label = None


def clear_region() -> None:
    st.session_state.clicks = []
    st.session_state.region = None
    st.session_state.masked_request = None
    st.session_state.masked = None


# ---------------------------------------------------------------- sidebar


def model_ui() -> tuple[ModelChoice, str, str]:
    """Model, device and the captioner's precision."""
    # `streamlit run app.py -- --captioner-dir D --clip-dir D`, or the environment (README).
    choices = model_choices(*local_model_dirs(os.environ, sys.argv[1:]))
    labels = [choice.label for choice in choices]
    with st.sidebar:
        st.header("Model")
        label = st.selectbox("Captioner and checker", labels, key="model_label")
        if st.session_state.model_notice and label == SHAPES_DEMO_CHOICE.label:
            st.info(escape_markdown(st.session_state.model_notice))
        if label == SHAPES_DEMO_CHOICE.label:
            st.caption(
                "Demo model: a small BLIP and CLIP trained on synthetic scenes of coloured shapes, "
                "where the truth is known. It is not a general captioner."
            )
        device = st.selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="device")
        # MPS computes bfloat16 only on recent systems: offer it where it always works.
        precisions = list(PRECISIONS) if device != "mps" else ["float32"]
        precision = st.selectbox(
            "Precision", precisions, key=f"precision_{device}",
            help="bfloat16 halves the captioner's memory; its maps are close to float32's, not equal.",
        )
    return choices[labels.index(label)], device, precision


def decoding_ui(captioner: CaptionerExplainer) -> Decoding:
    """Decoding options, drawn once the model is loaded: the longest caption is the model's."""
    # The model's position limit counts BOS; past MAX_NEW_TOKENS a caption is no longer a caption.
    longest = min(captioner.max_caption_tokens - 1, MAX_NEW_TOKENS)
    with st.sidebar:
        st.header("Decoding")
        num_beams = st.slider("Beams (1 = greedy)", 1, 5, 1, key="num_beams")
        max_new_tokens = st.slider(
            "Max new tokens", 1, longest, min(30, longest), key=f"max_new_tokens_{longest}",
            help=f"At most {captioner.max_caption_tokens} tokens for prompt and caption together, for this model.",
        )
        if captioner.prompt_choices:
            prompt = st.selectbox(
                captioner.prompt_label, captioner.prompt_choices, key="prompt_choice", help=captioner.prompt_help
            )
        else:
            prompt = st.text_input(captioner.prompt_label, "", key="prompt", max_chars=200, help=captioner.prompt_help)
    return Decoding(prompt, max_new_tokens, num_beams)


def counterfactual_ui() -> str:
    """Which image stands for "no image" when each word's visual reliance is measured."""
    with st.sidebar:
        st.header("Visual reliance")
        return st.selectbox(
            "Counterfactual image",
            COUNTERFACTUALS,
            key="counterfactual",
            help="A word's reliance compares its probability given the image with its probability given "
            "images that show nothing of it. others: the example images other than this one, the word's "
            "probability averaged over them (what the model says of a typical image); mean: the model's "
            "mean colour everywhere (its normalised input is all zeros); blurred: the image blurred, coarse "
            "colours kept; noise: random pixels.",
        )


def load_models_ui(
    choice: ModelChoice, device: str, precision: str
) -> tuple[CaptionerExplainer, ClipExplainer | None, str, str]:
    """Load the chosen models; fall back to the bundled demo with a notice when they are unavailable."""
    progress = st.empty()

    def show_progress(done: int, total: int) -> None:
        progress.progress(done / max(total, 1), text=f"Downloading model files: {done}/{total}")

    try:
        with st.spinner(f"Loading {choice.label}…"):
            captioner = load_captioner_cached(choice.captioner_source, device, precision, show_progress)
    except ModelUnavailableError as error:
        if choice == SHAPES_DEMO_CHOICE:
            st.error(f"The bundled demo model could not be loaded: {escape_markdown(str(error))}")
            st.stop()
        st.session_state.model_notice = f"{choice.label} is unavailable: {error} Showing the bundled demo instead."
        st.session_state.pending_model_label = SHAPES_DEMO_CHOICE.label
        st.rerun()
    progress.empty()
    clip = None
    try:
        clip = load_clip(choice.clip_source, device, show_progress)
    except ModelUnavailableError as error:
        st.sidebar.warning(f"CLIP is unavailable, so its checks are hidden: {escape_markdown(str(error))}")
    progress.empty()
    return captioner, clip, f"{choice.captioner_source}|{device}|{precision}", f"{choice.clip_source}|{device}"


# ---------------------------------------------------------------- input


def accept_image(data: bytes, name: str) -> None:
    """Make ``data`` the session's image if it loads; otherwise say why and keep the old one.
    It is decoded here, once: reruns work on the copy kept in the session."""
    working = st.session_state.working
    if working is not None and sha256(data) == working.sha256:
        return
    try:
        if len(data) > UPLOAD_MAX_MB << 20:
            raise ImageLoadError(f"The file is {len(data) / (1 << 20):.1f} MB, over the {UPLOAD_MAX_MB} MB limit.")
        working = load_working_image(data)
    except ImageLoadError as error:
        st.error(f"{escape_markdown(name)}: {escape_markdown(str(error))} The previous image is kept.")
        return
    st.session_state.working = working
    st.session_state.display_image = fit_for_display(working.image, DISPLAY_MAX_SIDE)
    st.session_state.image_name = name
    clear_region()
    st.session_state.video = None
    st.session_state.report = None


def image_input_ui() -> None:
    """Upload or example picker; a new choice replaces the image only when it loads."""
    upload_column, example_column = st.columns([3, 2])
    with upload_column:
        # No extension filter: Streamlit would raise on a wrong one, and a file's name says
        # nothing reliable about it. load_image accepts or refuses files by their content.
        upload = st.file_uploader("Upload an image (JPG, PNG, WebP, BMP or GIF)", key="upload", help=UPLOAD_LIMITS_TEXT)
        st.caption(UPLOAD_LIMITS_TEXT)
    with example_column:
        example = st.selectbox("…or pick an example", ["(none)", *example_names()], key="example")
    if upload is not None and upload.file_id != st.session_state.last_upload_id:
        st.session_state.last_upload_id = upload.file_id
        accept_image(upload.getvalue(), upload.name)
    if example != "(none)" and example != st.session_state.last_example:
        st.session_state.last_example = example
        accept_image((EXAMPLES_DIR / example).read_bytes(), example)


# ---------------------------------------------------------------- caption and heatmap


def caption_ui(page: Page) -> int:
    """The caption and one pill per word with its probability; returns the chosen word index."""
    caption = page.caption
    st.subheader(f"“{escape_markdown(caption.text)}”")
    if page.demo and not st.session_state.image_name.startswith("scene_"):
        st.info(
            "The demo captioner has only ever seen synthetic scenes of coloured shapes, so it describes "
            "any image in those words; its heatmaps are checked against those scenes' known objects. "
            "For photographs, choose BLIP in the sidebar (it needs the hub or a local folder)."
        )
    if not caption.words:
        st.warning("The caption has no words to explain.")
        st.stop()
    evidence = page.evidence()
    if st.session_state.word_caption != page.key.caption:  # a new caption starts at its first content word
        st.session_state.word_caption = page.key.caption
        st.session_state.word = first_content_word([word.text for word in caption.words])
    chosen = st.pills(
        "Explain which word?",
        list(range(len(caption.words))),
        format_func=lambda index: (
            f"{escape_markdown(caption.words[index].text)} · {evidence.probabilities[index]:.0%} · "
            f"{reliance_mark(evidence.reliance[index], LANGUAGE_PRIOR_NATS)}"
        ),
        key="word",
    )
    st.caption(
        f"After each word: its probability, then how much the image raised it (visual reliance: log p with "
        f"the image minus log p given the {COUNTERFACTUAL_NAMES[evidence.counterfactual]}, "
        f"{' '.join(RELIANCE_BARS)} up to {RELIANCE_FULL_BAR_NATS:g} nats or more). **prior**: under "
        f"{LANGUAGE_PRIOR_NATS:g} nats, the word comes from the language model's prior, not from the image."
    )
    return 0 if chosen is None else chosen


@dataclass(frozen=True)
class ViewSettings:
    """How the heatmap is shown: the controls above it, read by every section through view_settings."""

    method: str
    layer: int
    opacity: float
    colormap: str
    show_grid: bool
    shared_scale: bool


# The display controls' defaults (the method's default layer comes from the model).
DISPLAY_DEFAULTS = {"opacity": 0.5, "colormap": "jet", "show_grid": False, "shared_scale": False}


def view_settings(captioner: CaptionerExplainer) -> ViewSettings:
    """The heatmap controls' values: the widgets' own once drawn, their defaults before."""
    state = st.session_state
    method = state.get("method", captioner.default_method)
    display = {name: state.get(name, default) for name, default in DISPLAY_DEFAULTS.items()}
    return ViewSettings(method, state.get(f"layer_{method}", captioner.default_layer(method)), **display)


def heatmap_controls_ui(captioner: CaptionerExplainer) -> ViewSettings:
    """Method, layer, opacity, colour map, patch grid and colour-scale controls."""
    default = DISPLAY_DEFAULTS
    controls = st.columns(5)
    methods = list(captioner.methods)
    method = controls[0].selectbox(
        "Method", methods, index=methods.index(captioner.default_method), format_func=captioner.method_label,
        key="method",
    )
    layer_names = captioner.layer_names(method)
    controls[1].select_slider(
        "Layer (shallow → deep)",
        options=list(range(len(layer_names))),
        value=captioner.default_layer(method),
        format_func=lambda index: layer_names[index],
        key=f"layer_{method}",
    )
    controls[2].slider("Opacity", 0.0, 1.0, default["opacity"], 0.05, key="opacity")
    colormaps = colormap_names()
    controls[3].selectbox("Colour map", colormaps, index=colormaps.index(default["colormap"]), key="colormap")
    controls[4].toggle("Patch grid", value=default["show_grid"], key="show_grid")
    controls[4].toggle("One scale for all layers", value=default["shared_scale"], key="shared_scale")
    return view_settings(captioner)


def with_grid(page: Page, shown: Image.Image) -> Image.Image:
    """``shown`` (the displayed image or an overlay) with lines at the model's patch boundaries."""
    return draw_grid(shown, *page.captioner.image_geometry(shown.size).patch_lines_image())


def region_image(page: Page, show_grid: bool) -> Image.Image:
    """The displayed image with the patch grid, the pending click and the region drawn on it."""
    scale = page.display_image.width / page.image.width
    shown = with_grid(page, page.display_image) if show_grid else page.display_image
    if len(st.session_state.clicks) == 1:
        x, y = st.session_state.clicks[0]
        shown = draw_marker(shown, (round(x * scale), round(y * scale)), REGION_COLOUR)
    if st.session_state.region:
        for box in st.session_state.region[1]:
            scaled = (round(box.x0 * scale), round(box.y0 * scale), round(box.x1 * scale), round(box.y1 * scale))
            shown = draw_box(shown, scaled, REGION_COLOUR, 2)
    return shown


def handle_click(value: object, working: WorkingImage) -> None:
    """Turn a new click (in displayed pixels) into a corner on the working copy; two make a
    box, described in pixels of the original image. A malformed value from the page is ignored."""
    if not isinstance(value, dict) or value.get("unix_time") == st.session_state.last_click_time:
        return  # the component returns its last click again on every rerun
    st.session_state.last_click_time = value.get("unix_time")
    point = click_to_image(value, working.image.size)
    if point is None:
        return
    clicks = [] if len(st.session_state.clicks) >= 2 else list(st.session_state.clicks)
    clicks.append(point)
    st.session_state.clicks = clicks
    st.session_state.region = None
    if len(clicks) == 2:
        box = box_from_corners(clicks[0], clicks[1], working.image.size)
        x0, y0, x1, y1 = working.original_box((box.x0, box.y0, box.x1, box.y1))
        st.session_state.region = (f"rectangle ({x0}, {y0}) → ({x1}, {y1})", (box,))
    st.rerun()


@st.fragment
def heatmap_ui(page: Page, word: int, page_view: ViewSettings) -> None:
    """Original image (click twice for a region) beside the chosen word's heatmap.

    A fragment: opacity, colour map, grid and scale rerun this section only. A new method or
    layer reruns the whole page, since the panels below (metrics, video, report) use it too;
    ``page_view`` is the selection they were drawn with.
    """
    view = heatmap_controls_ui(page.captioner)
    if (view.method, view.layer) != (page_view.method, page_view.layer):
        st.rerun(scope="app")
    try:
        maps = page.word_maps(view.method, word)
    except ExplanationTooLargeError as error:
        # Nothing below can be drawn without the maps; the method box above stays to choose another.
        st.error(escape_markdown(str(error)))
        st.stop()
    evidence = page.evidence()
    if evidence.from_prior[word]:
        st.warning(
            f"“{escape_markdown(maps.word)}” barely depends on the image ({evidence.reliance[word]:+.2f} nats "
            f"against the {COUNTERFACTUAL_NAMES[evidence.counterfactual]}): it comes from the language model's "
            "prior, so this heatmap is no evidence of where it is."
        )
    heat, value_range = page.heat_images(maps)
    overlay = overlay_heatmap(
        page.display_image,
        heat[view.layer],
        alpha=view.opacity,
        colormap=view.colormap,
        value_range=value_range if view.shared_scale else None,
    )
    left, right = st.columns(2)
    with left:
        st.caption("Click two corners to select a region.")
        shown = region_image(page, view.show_grid)
        value = streamlit_image_coordinates(shown, width=DISPLAY_WIDTH, key="region_clicks")
        handle_click(value, page.working)
    with right:
        word_text = escape_markdown(maps.word)
        # A contrastive target names what the word is explained against ("why red, not blue?").
        against = "" if maps.foil is None else f" against “{escape_markdown(maps.foil)}”"
        st.caption(f"“{word_text}”{against} · {maps.layer_names[view.layer]} · score {maps.score:.2f}")
        st.image(with_grid(page, overlay) if view.show_grid else overlay, width=DISPLAY_WIDTH)
    region_controls_ui(page, maps.cam_patches[view.layer], maps.word)


def region_controls_ui(page: Page, cam_patches, word: str) -> None:
    """Reset the region, or select the heatmap's top patches as the region."""
    reset_column, fraction_column, auto_column = st.columns([1, 2, 1])
    if reset_column.button("Reset region", key="reset_region"):
        clear_region()
        st.rerun()
    fraction = fraction_column.slider("Auto region: top % of patches", 1, 50, 10, key="auto_fraction")
    if auto_column.button("Auto region", key="auto_region"):
        boxes = page.patch_boxes(top_patches(cam_patches, fraction / 100))
        st.session_state.clicks = []
        st.session_state.region = (f"top {fraction}% of patches for “{word}”", boxes)
        st.rerun()


# ---------------------------------------------------------------- mask and regenerate


def mask_ui(page: Page) -> MaskedCaption | None:
    """Fill the region, caption again, and show what changed."""
    st.header("Causal test: mask the region and caption again")
    if not st.session_state.region:
        st.info("Select a region on the image (two clicks, or Auto region) to run the causal test.")
        return None
    description, boxes = st.session_state.region
    st.write(f"Region: {escape_markdown(description)}")
    fill = st.selectbox("Fill", FILL_MODES, index=FILL_MODES.index(DEFAULT_FILL), key="fill")
    request = (repr(boxes), fill)
    if st.button("Mask and regenerate", type="primary", key="regenerate"):
        st.session_state.masked_request = request
    if st.session_state.masked_request != request:
        return None
    masked, shown = masked_caption(page, boxes, fill)
    caption = page.caption
    before, after = st.columns(2)
    before.image(shown, caption="Masked image", width=DISPLAY_WIDTH)
    with after:
        st.markdown(f"**Before:** {escape_markdown(caption.text)}")
        st.markdown(f"**After:** {escape_markdown(masked.caption.text)}")
        st.markdown(diff_html(masked.diff), unsafe_allow_html=True)  # diff_html escapes every word
        if masked.removed:
            st.success(f"Removed: {escape_markdown(', '.join(masked.removed))}")
        else:
            st.info("No word of the original caption disappeared.")
    st.caption("Change in teacher-forced log p of each original word under the mask")
    st.pyplot(log_prob_change_figure(numbered_words(caption), masked.log_prob_change.tolist()))
    if page.clip is not None:
        clip_pairs_ui(page, masked, f"{page.key.image}|masked|{boxes!r}|{fill}")
    return masked


def clip_pairs_ui(page: Page, masked: MaskedCaption, masked_image_key: str) -> None:
    """CLIP similarity before and after masking, for the old and the new caption."""
    masked_key = WorkKey(page.clip_model_key, masked_image_key)
    pairs = [
        ("original image · original caption", page.clip_key, page.image, page.caption.text),
        ("masked image · original caption", masked_key, masked.masked_image, page.caption.text),
        ("masked image · new caption", masked_key, masked.masked_image, masked.caption.text),
    ]
    for column, (label, key, shown_image, text) in zip(st.columns(3), pairs, strict=True):
        score = cached_similarity(key, (text,), page.clip, shown_image).cosine_x100[0]
        column.metric(f"CLIP: {label}", f"{score:.1f}")


def numbered_words(caption: Caption) -> list[str]:
    """Unique labels for the caption's words ("1. a", "2. dog"), since words repeat."""
    return [f"{index + 1}. {word.text}" for index, word in enumerate(caption.words)]


# ---------------------------------------------------------------- metrics


def metrics_ui(page: Page, word: int, view: ViewSettings) -> dict:
    """Deletion/insertion curves, the most faithful layer, the minimal removing region and a
    model-randomisation sanity check for the chosen word, method and layer."""
    st.header("Metrics for the chosen word")
    method, layer = view.method, view.layer
    fill_column, steps_column = st.columns(2)
    fill = fill_column.selectbox(
        "Fill for masked patches", FILL_MODES, index=FILL_MODES.index(DEFAULT_FILL), key="metrics_fill"
    )
    steps = steps_column.slider("Curve steps", 4, 32, 16, key="metrics_steps")
    request = (page.key, word, method, layer, fill, steps)
    measure_column, sanity_column = st.columns(2)
    if measure_column.button("Measure faithfulness", key="measure"):
        st.session_state.metrics_request = request
    if sanity_column.button("Sanity check (randomise top layers)", key="sanity"):
        st.session_state.sanity_request = request
    reported = {}
    if st.session_state.metrics_request == request:
        maps = page.word_maps(method, word)
        result = cached_word_faithfulness(
            page.key, word, method, layer, fill, steps, page.decoding, page.captioner, page.image, page.caption, maps
        )
        reported = faithfulness_ui(page, maps, layer, result)
    if st.session_state.sanity_request == request:
        check = cached_sanity_check(page.key, word, method, layer, page.captioner, page.image, page.caption)
        message = f"Rank correlation of the map before and after randomising the top layers: {check.correlation:.2f}."
        if check.barely_depends:
            st.warning(message + " The map barely depends on the weights, so it cannot be explaining them.")
        else:
            st.success(message + " The map changes with the weights, as an explanation should.")
        reported["sanity_rank_correlation"] = check.correlation
    return reported


def faithfulness_ui(page: Page, maps: WordMaps, layer: int, result: WordFaithfulness) -> dict:
    """Show one word's faithfulness numbers; offer its minimal removing region as the region."""
    curves, removal = result.curves, result.removal
    st.pyplot(curves_figure(curves, maps.word))
    numbers = {
        "deletion_auc": float(curves.deletion.auc),
        "random_deletion_auc": float(curves.random_deletion.auc),
        "insertion_auc": float(curves.insertion.auc),
        "random_insertion_auc": float(curves.random_insertion.auc),
        "best_layer": result.layers.best_layer_name,
        "removing_patches": removal.patch_count if removal.removed else None,
        "removing_image_share": removal.image_share if removal.removed else None,
    }
    deletion_gain = numbers["deletion_auc"] - numbers["random_deletion_auc"]
    insertion_gain = numbers["insertion_auc"] - numbers["random_insertion_auc"]
    columns = st.columns(4)
    columns[0].metric("Deletion AUC (lower is better)", f"{numbers['deletion_auc']:.2f}",
                      f"{deletion_gain:+.2f} vs random", delta_color="inverse")
    columns[1].metric("Insertion AUC (higher is better)", f"{numbers['insertion_auc']:.2f}",
                      f"{insertion_gain:+.2f} vs random")
    columns[2].metric("Most faithful layer", result.layers.best_layer_name)
    columns[3].metric("Patches that remove the word", numbers["removing_patches"] or "none ≤ 50%")
    if removal.removed:
        st.write(
            f"Masking the top {removal.patch_count} patches ({removal.image_share:.0%} of the image) of "
            f"{escape_markdown(maps.layer_names[layer])} removes “{escape_markdown(maps.word)}”: "
            f"the caption becomes “{escape_markdown(' '.join(removal.caption_words))}”."
        )
        if st.button("Use the minimal region", key="use_minimal_region"):
            boxes = page.patch_boxes(removal.patch_ids)
            st.session_state.clicks = []
            st.session_state.region = (f"minimal removing region for “{maps.word}”", boxes)
            # The causal test's fill widget may not exist yet (no region before): use its default.
            st.session_state.masked_request = (repr(boxes), st.session_state.get("fill", DEFAULT_FILL))
            st.rerun()
    return numbers


# ---------------------------------------------------------------- CLIP


@dataclass(frozen=True)
class ClipShown:
    """The CLIP heatmap on the page and what it explains."""

    overlay: Image.Image
    text: str
    layer: int


def clip_ui(page: Page, word: int, view: ViewSettings) -> ClipShown | None:
    """CLIP similarity for an editable sentence, and CLIP's heatmap beside the captioner's."""
    st.header("Check with CLIP")
    clip = page.clip
    if clip is None:
        st.info("CLIP is not loaded.")
        return None
    caption_text = page.caption.text
    text = st.text_input("Sentence to check", caption_text, max_chars=300, key=f"clip_text_{page.key.caption}")
    similarity = cached_similarity(page.clip_key, (caption_text, text), clip, page.image)
    caption_score, text_score = similarity.cosine_x100
    caption_column, text_column = st.columns(2)
    caption_column.metric("CLIP score of the caption", f"{caption_score:.1f}")
    text_column.metric("CLIP score of your sentence", f"{text_score:.1f}", f"{text_score - caption_score:+.1f}")
    for name, checked in (("caption", caption_text), ("sentence", text)):
        seen = clip.text_seen(checked)
        if seen is not None:
            st.caption(
                f"CLIP reads at most {clip.max_text_tokens} tokens, so the {name} was cut: "
                f"CLIP saw “{escape_markdown(seen)}”."
            )
    target = st.radio("CLIP heatmap for", ["the sentence", "the chosen word"], horizontal=True, key="clip_target")
    layer = st.select_slider(
        "CLIP layer", options=list(clip.cam_layers), value=clip.default_layer, format_func=clip.layer_name,
        key="clip_layer",
    )
    explained = text if target == "the sentence" else page.caption.words[word].text
    clip_map = cached_clip_map(page.clip_key, explained, layer, clip, page.image)
    clip_heat = page.display_geometry(clip).cam_to_image(clip_map.cam_patches)
    clip_overlay = overlay_heatmap(page.display_image, clip_heat)
    maps = page.word_maps(view.method, word)
    heat = page.display_geometry(page.captioner).cam_to_image(maps.cam_patches[view.layer])
    captioner_overlay = overlay_heatmap(page.display_image, heat)
    left, right = st.columns(2)
    left.image(
        captioner_overlay,
        caption=f"Captioner · “{escape_markdown(maps.word)}” · {maps.layer_names[view.layer]}",
        width=DISPLAY_WIDTH,
    )
    right.image(
        clip_overlay,
        caption=f"CLIP · “{escape_markdown(explained)}” · {clip_map.layer_name} (hatched: outside CLIP's centre crop)",
        width=DISPLAY_WIDTH,
    )
    return ClipShown(clip_overlay, explained, layer)


# ---------------------------------------------------------------- video and report


def video_ui(page: Page, word: int, view: ViewSettings) -> bytes | None:
    """Build, play and download the chosen word's heatmap evolving across layers."""
    st.header("Layer evolution video")
    video_key = (page.key, view.method, word, view.colormap)
    if st.button("Build video", key="build_video"):
        progress = st.progress(0.0, text="Computing maps for every layer…")
        maps = page.word_maps(view.method, word)
        heat, _ = page.heat_images(maps)
        progress.progress(0.3, text="Drawing frames…")
        frames = layer_frames(
            page.display_image, heat, maps.layer_names, maps.word, alpha=0.5,
            colormap=view.colormap, hold_frames=VIDEO_FPS, fade_frames=VIDEO_FPS // 3,
        )
        progress.progress(0.6, text="Encoding H.264…")
        st.session_state.video = (video_key, encode_mp4(frames, VIDEO_FPS))
        progress.progress(1.0, text="Done")
    if not (st.session_state.video and st.session_state.video[0] == video_key):
        return None
    video = st.session_state.video[1]
    st.video(video, format="video/mp4")
    st.download_button(
        "Download MP4", video, file_name="layer_evolution.mp4", mime="video/mp4", on_click="ignore", key="mp4"
    )
    return video


@dataclass(frozen=True)
class Shown:
    """What the page shows below the heatmap, as the report collects it."""

    word: int
    view: ViewSettings
    masked: MaskedCaption | None
    measured: dict
    clip: ClipShown | None
    video: bytes | None

    def key(self, page: Page) -> str:
        """Names what the report would hold: a report for anything else is not offered."""
        clip = self.clip and (self.clip.text, self.clip.layer)
        video = self.video and sha256(self.video)
        masked = self.masked and st.session_state.masked_request
        view = (self.view.method, self.word, self.view.layer, page.counterfactual)
        return repr((page.key, *view, masked, self.measured, clip, video))


def report_ui(page: Page, model_label: str, shown: Shown) -> None:
    """One ZIP (images, captions, metrics, video) and the same as a self-contained HTML page.

    Built on request, not on every rerun: encoding every layer's PNG costs seconds on big images.
    Offered only while the page still shows what it was built from.
    """
    st.header("Report")
    key = shown.key(page)
    if st.button("Prepare report", key="prepare_report"):
        content = report_content(page, model_label, shown)
        st.session_state.report = (key, report_zip(content), report_html(content))
    if not (st.session_state.report and st.session_state.report[0] == key):
        st.caption("Collects what is on the page now: heatmaps of every layer, mask, captions, metrics, video.")
        return
    _, archive, page_html = st.session_state.report
    zip_column, html_column = st.columns(2)
    zip_column.download_button(
        "Download report (ZIP)", archive, file_name="vlm_explainer_report.zip",
        mime="application/zip", on_click="ignore", key="report_zip",
    )
    html_column.download_button(
        "Download report (HTML)", page_html, file_name="vlm_explainer_report.html",
        mime="text/html", on_click="ignore", key="report_html",
    )


def report_content(page: Page, model_label: str, shown: Shown) -> ReportContent:
    """Everything the report holds, from what the page shows now."""
    method, masked = shown.view.method, shown.masked
    maps = page.word_maps(method, shown.word)
    heat, value_range = page.heat_images(maps)
    heatmaps = tuple(
        (f"{page.captioner.method_label(method)} · {name} · word: {maps.word}",
         overlay_heatmap(page.display_image, layer_heat, value_range=value_range))
        for name, layer_heat in zip(maps.layer_names, heat, strict=True)
    )
    if shown.clip is not None:
        heatmaps += (("CLIP", shown.clip.overlay),)
    evidence = page.evidence()
    metrics = {
        "word": maps.word, "method": method, "foil": maps.foil, "score": maps.score,
        "visual_reliance_nats": float(evidence.reliance[shown.word]), "counterfactual": evidence.counterfactual,
        **shown.measured,
    }  # fmt: skip
    # The page works on a copy of at most WORKING_MAX_SIDE pixels; boxes are given in the original's.
    metrics["original_size"] = list(page.working.original_size)
    if masked is not None:
        _, boxes = st.session_state.region
        corners = [(box.x0, box.y0, box.x1, box.y1) for box in boxes]
        metrics["region_original_pixels"] = [list(page.working.original_box(corner)) for corner in corners]
        metrics["removed_words"] = masked.removed
        changes = masked.log_prob_change.tolist()
        metrics["log_prob_change"] = dict(zip(numbered_words(page.caption), changes, strict=True))
    return ReportContent(
        title=f"VLM Explainer report: {st.session_state.image_name}",
        model_name=model_label,
        original_image=page.image,
        heatmaps=heatmaps,
        mask_image=masked.mask_image if masked else None,
        masked_image=masked.masked_image if masked else None,
        captions={"original": page.caption.text, **({"masked": masked.caption.text} if masked else {})},
        diff=masked.diff if masked else None,
        metrics=metrics,
        video_mp4=shown.video,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


# ---------------------------------------------------------------- page


def main() -> None:
    st.set_page_config(page_title="VLM Explainer", layout="wide")
    return_large_buffers()
    init_state()
    st.title("VLM Explainer")
    st.caption("Why did the model write that word? Heatmaps, a causal masking test and a CLIP cross-check.")
    choice, device, precision = model_ui()
    captioner, clip, model_key, clip_model_key = load_models_ui(choice, device, precision)
    decoding = decoding_ui(captioner)
    image_input_ui()
    if st.session_state.working is None:
        st.info("Upload an image or pick an example scene to begin.")
        return
    working = st.session_state.working
    image_key = WorkKey(model_key, working.sha256)
    try:
        caption = cached_caption(image_key, decoding, captioner, working.image)
    except PromptTooLongError as error:
        st.error(escape_markdown(str(error)))
        return
    page = Page(
        captioner, clip, replace(image_key, caption="-".join(map(str, caption.token_ids))), clip_model_key,
        working, st.session_state.display_image, caption, decoding, choice == SHAPES_DEMO_CHOICE,
        counterfactual_ui(),
    )
    word = caption_ui(page)
    view = view_settings(captioner)
    heatmap_ui(page, word, view)
    masked = mask_ui(page)
    measured = metrics_ui(page, word, view)
    clip_shown = clip_ui(page, word, view)
    video = video_ui(page, word, view)
    report_ui(page, choice.label, Shown(word, view, masked, measured, clip_shown, video))
    fill_word_maps(page, view.method)


def fill_word_maps(page: Page, method: str) -> None:
    """Once the page is drawn, every word's maps in one pass, so that choosing another word
    shows its maps at once."""
    if (page.key, method) not in st.session_state.filled_word_maps:
        page.all_word_maps(method)
        st.session_state.filled_word_maps.add((page.key, method))


if __name__ == "__main__":  # Streamlit runs the script as __main__; tests import its constants
    main()
