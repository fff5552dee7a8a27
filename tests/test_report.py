"""Tests for utils/report.py: deterministic ZIP contents and a self-contained, escaped HTML page."""

from __future__ import annotations

import io
import json
import zipfile
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from utils.caption_diff import word_diff
from utils.report import ReportContent, flatten_metrics, heatmap_file_name, report_html, report_zip, to_json_safe

SCRIPT_ATTACK = "<script>alert(1)</script>"
ATTRIBUTE_ATTACK = '"><img src=x onerror=alert(1)>'
FAKE_VIDEO = b"\x00\x00\x00\x18ftypmp42 not really a video"


def solid_image(size: tuple[int, int], colour: tuple[int, int, int], mode: str = "RGB") -> Image.Image:
    """A one-colour image of (width, height), built afresh so equal reports share no objects."""
    return Image.new("RGB", size, colour).convert(mode)


def sample_content(**changes) -> ReportContent:
    """A report with every optional part present; keyword arguments replace fields."""
    original_caption, masked_caption = "a red circle and a blue square", "a blue square"
    fields = dict(
        title="Why 'circle'?",
        model_name="Salesforce/blip-image-captioning-base",
        original_image=solid_image((40, 30), (200, 30, 30)),
        heatmaps=(
            ("BLIP hirescam · vision layer 4/4 · word: circle", solid_image((40, 30), (0, 0, 255))),
            ("CLIP gradcam · text: a red circle", solid_image((20, 16), (0, 255, 0))),
        ),
        mask_image=solid_image((40, 30), (255, 255, 255), mode="L"),
        masked_image=solid_image((40, 30), (128, 128, 128)),
        captions={"original": original_caption, "masked": masked_caption},
        diff=word_diff(original_caption.split(), masked_caption.split()),
        metrics={
            "clip_similarity": np.float32(0.25),
            "pointing_game": {"hit": True, "distance": float("nan")},
            "deletion_curve": np.array([1.0, 0.5, np.nan]),
            "layers": 4,
        },
        video_mp4=FAKE_VIDEO,
        created="2025-03-04T05:06:08",
    )
    fields.update(changes)
    return ReportContent(**fields)


def attacked_content() -> ReportContent:
    """A report whose every text field carries script and attribute injections."""
    attack = SCRIPT_ATTACK + ATTRIBUTE_ATTACK
    return sample_content(
        title=attack,
        model_name=attack,
        heatmaps=((attack, solid_image((8, 8), (0, 0, 0))),),
        captions={attack: attack},
        diff=word_diff([attack, "circle"], ["circle", attack]),
        metrics={attack: attack, "nested": {attack: [attack]}},
    )


def open_zip(data: bytes) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(data))


class TagCollector(HTMLParser):
    """Record every start tag with its attributes, as a browser would parse them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def parsed_tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    collector = TagCollector()
    collector.feed(page)
    collector.close()
    return collector.tags


# ZIP


def test_zip_holds_the_expected_members_in_order() -> None:
    names = open_zip(report_zip(sample_content())).namelist()
    assert names == [
        "original.png",
        "heatmaps/01_blip-hirescam-vision-layer-4-4-word-circle.png",
        "heatmaps/02_clip-gradcam-text-a-red-circle.png",
        "mask.png",
        "masked.png",
        "captions.json",
        "metrics.json",
        "layers.mp4",
        "report.html",
    ]


def test_zip_leaves_out_the_optional_parts() -> None:
    content = sample_content(heatmaps=(), mask_image=None, masked_image=None, diff=None, video_mp4=None)
    names = open_zip(report_zip(content)).namelist()
    assert names == ["original.png", "captions.json", "metrics.json", "report.html"]


def test_zip_members_are_deflated_and_dated_from_created() -> None:
    for info in open_zip(report_zip(sample_content())).infolist():
        assert info.compress_type == zipfile.ZIP_DEFLATED
        assert info.date_time == (2025, 3, 4, 5, 6, 8)


def test_zip_pngs_decode_to_the_right_sizes_and_pixels() -> None:
    content = sample_content()
    archive = open_zip(report_zip(content))
    expected = {
        "original.png": content.original_image,
        "heatmaps/01_blip-hirescam-vision-layer-4-4-word-circle.png": content.heatmaps[0][1],
        "heatmaps/02_clip-gradcam-text-a-red-circle.png": content.heatmaps[1][1],
        "mask.png": content.mask_image,
        "masked.png": content.masked_image,
    }
    for name, image in expected.items():
        decoded = Image.open(io.BytesIO(archive.read(name)))
        assert decoded.format == "PNG"
        assert decoded.size == image.size
        assert np.array_equal(np.asarray(decoded), np.asarray(image)), name


def test_zip_json_round_trips_with_nan_as_null() -> None:
    content = sample_content()
    archive = open_zip(report_zip(content))
    assert json.loads(archive.read("captions.json")) == content.captions
    assert json.loads(archive.read("metrics.json")) == {
        "clip_similarity": 0.25,
        "pointing_game": {"hit": True, "distance": None},
        "deletion_curve": [1.0, 0.5, None],
        "layers": 4,
    }
    assert b"NaN" not in archive.read("metrics.json")


def test_zip_carries_the_video_and_the_html_page() -> None:
    content = sample_content()
    archive = open_zip(report_zip(content))
    assert archive.read("layers.mp4") == FAKE_VIDEO
    assert archive.read("report.html").decode("utf-8") == report_html(content)


def test_zip_bytes_are_deterministic() -> None:
    first, second = report_zip(sample_content()), report_zip(sample_content())
    assert first == second
    assert report_zip(sample_content(created="2025-03-04T05:06:10")) != first


@pytest.mark.parametrize(
    "label",
    ["../../etc/passwd", "/etc/passwd", "..\\..\\windows\\system32", "C:\\boot.ini", "..", "", "·/·", "a\x00b"],
)
def test_zip_member_names_stay_inside_the_archive(label: str) -> None:
    content = sample_content(heatmaps=((label, solid_image((4, 4), (0, 0, 0))),))
    names = open_zip(report_zip(content)).namelist()
    heatmap_names = [name for name in names if name.startswith("heatmaps/")]
    assert len(heatmap_names) == 1
    for name in names:
        assert not name.startswith("/") and "\\" not in name and ":" not in name
        assert ".." not in name.split("/")
        assert "/.." not in name
    directory, file_name = heatmap_names[0].split("/")
    assert file_name.startswith("01_") and file_name.endswith(".png")
    assert set(file_name.removesuffix(".png")) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def test_heatmap_file_names_are_unique_and_short() -> None:
    assert heatmap_file_name(1, "../../etc/passwd") == "heatmaps/01_etc-passwd.png"
    assert heatmap_file_name(12, "Ünïcödé wörd") == "heatmaps/12_unicode-word.png"
    assert heatmap_file_name(3, "%%%") == "heatmaps/03_heatmap.png"
    assert len(heatmap_file_name(1, "word " * 100)) <= len("heatmaps/01_.png") + 60
    assert heatmap_file_name(1, "same") != heatmap_file_name(2, "same")


def test_content_refuses_a_bad_timestamp_and_bad_heatmaps() -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        sample_content(created="yesterday")
    with pytest.raises(ValueError, match="1980"):
        sample_content(created="1970-01-01T00:00:00")
    with pytest.raises(TypeError, match="label, PIL image"):
        sample_content(heatmaps=((solid_image((4, 4), (0, 0, 0)), "swapped"),))


# JSON and metrics helpers


def test_to_json_safe_converts_numpy_and_non_finite_values() -> None:
    value = {
        1: np.int64(3),
        "flag": np.bool_(True),
        "grid": np.array([[0.5, np.inf], [np.nan, -1.0]], dtype=np.float32),
        "pair": (np.float64(-np.inf), "text"),
        "none": None,
    }
    converted = to_json_safe(value)
    assert converted == {"1": 3, "flag": True, "grid": [[0.5, None], [None, -1.0]], "pair": [None, "text"],
                         "none": None}
    assert type(converted["1"]) is int and type(converted["flag"]) is bool
    json.dumps(converted, allow_nan=False)


def test_to_json_safe_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError, match="bytes"):
        to_json_safe({"raw": b"\x00"})


def test_flatten_metrics_joins_nested_keys_with_dots() -> None:
    metrics = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "text"}
    assert flatten_metrics(metrics) == [("a.b", 1), ("a.c.d", [1, 2]), ("e", "text")]


# HTML


def test_html_is_self_contained() -> None:
    page = report_html(sample_content())
    assert "http://" not in page and "https://" not in page
    for tag, attributes in parsed_tags(page):
        for attribute in ("src", "href"):
            if attribute in attributes:
                assert attributes[attribute].startswith("data:"), (tag, attribute)
    assert "data:image/png;base64," in page
    assert page.count("<img ") == 5  # original, mask, masked and two heatmaps


def test_html_embeds_the_video_only_when_given() -> None:
    assert "data:video/mp4;base64," in report_html(sample_content())
    assert "<video" in report_html(sample_content())
    without_video = report_html(sample_content(video_mp4=None))
    assert "<video" not in without_video and "data:video/mp4" not in without_video


def test_html_shows_title_model_captions_diff_metrics_and_labels() -> None:
    page = report_html(sample_content())
    assert "<title>Why &#x27;circle&#x27;?</title>" in page
    assert "Salesforce/blip-image-captioning-base" in page
    assert "a red circle and a blue square" in page
    assert "line-through" in page  # the struck-through words of the diff
    assert "BLIP hirescam · vision layer 4/4 · word: circle" in page
    assert "<th>pointing_game.distance</th>" in page  # nested metrics flattened
    assert "<th>clip_similarity</th><td class=\"value\">0.25</td>" in page
    assert "[1, 0.5, n/a]" in page


def test_html_leaves_out_empty_sections() -> None:
    page = report_html(sample_content(heatmaps=(), diff=None, metrics={}, video_mp4=None))
    assert "<h2>Heatmaps</h2>" not in page and "<h2>Caption change</h2>" not in page
    assert "<h2>Metrics</h2>" not in page


def test_html_escapes_every_text_field() -> None:
    page = report_html(attacked_content())
    assert "<script" not in page.lower()
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    tags = parsed_tags(page)
    assert {tag for tag, _ in tags} <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code", "span", "table", "tr", "th",
        "td", "div", "figure", "img", "figcaption", "video", "source",
    }
    for tag, attributes in tags:
        assert not any(name.startswith("on") for name in attributes), tag
        if tag == "img":
            assert attributes["src"].startswith("data:image/png;base64,")
    # Every "onerror=" left is inside escaped text, never an attribute.
    assert page.count("onerror=") == page.count("&lt;img src=x onerror=alert(1)&gt;")


def test_zip_of_attacked_content_escapes_its_page_too() -> None:
    archive = open_zip(report_zip(attacked_content()))
    assert "<script" not in archive.read("report.html").decode("utf-8").lower()
    attack = SCRIPT_ATTACK + ATTRIBUTE_ATTACK
    assert json.loads(archive.read("captions.json")) == {attack: attack}


def test_report_leaves_its_content_unchanged() -> None:
    content = sample_content()
    original_pixels = np.asarray(content.original_image).copy()
    report_zip(content)
    report_html(content)
    # NaN and numpy values are converted in copies, never in the caller's metrics.
    assert isinstance(content.metrics["clip_similarity"], np.float32)
    assert np.isnan(content.metrics["pointing_game"]["distance"])
    assert isinstance(content.metrics["deletion_curve"], np.ndarray)
    assert np.isnan(content.metrics["deletion_curve"][2])
    assert np.array_equal(np.asarray(content.original_image), original_pixels)
