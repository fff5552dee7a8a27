"""A downloadable report of one explanation: a deterministic ZIP of its files and a self-contained HTML page.

Every piece of user-supplied text (title, captions, labels, metrics, model name) is escaped, and the
page loads nothing from outside: images and video are embedded as data URIs.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import unicodedata
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image

from utils.caption_diff import DiffToken, diff_html
from utils.image_utils import to_png_bytes

SLUG_MAX_LENGTH = 60
METRIC_LIST_ITEMS_SHOWN = 8
# ZIP stores local wall-clock time in two-second steps within these years only.
ZIP_FIRST_YEAR = 1980
ZIP_LAST_YEAR = 2107
# Read as Unix permissions (rw-r--r--) by unzip tools; left at zero some extract files unreadable.
ZIP_FILE_ATTRIBUTES = 0o644 << 16
ZIP_CREATED_ON_UNIX = 3

# Even if some text slipped through unescaped, the browser would run no script and fetch nothing.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; media-src data:; style-src 'unsafe-inline'"
PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; }
.meta { color: #666; margin-top: 0; }
.diff { font-size: 1.2em; line-height: 1.8; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; max-width: 340px; }
figure img, video { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; word-break: break-word; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
td.value { font-family: ui-monospace, monospace; }
"""


@dataclass(frozen=True)
class ReportContent:
    """Everything a report shows; ``created`` is an ISO timestamp chosen by the caller.

    Args:
        title: heading of the report (user text).
        model_name: the explained model, e.g. "Salesforce/blip-image-captioning-base".
        original_image: the uploaded image, RGB.
        heatmaps: (label, overlay image) pairs, e.g. ("BLIP hirescam · vision layer 4/4 · word: circle", overlay).
        mask_image: white where the image was masked, or None.
        masked_image: the image the model saw after masking, or None.
        captions: caption per name, e.g. {"original": ..., "masked": ...}.
        diff: word diff between two captions (utils.caption_diff.word_diff), or None.
        metrics: JSON-like values: numbers (numpy included, NaN allowed), strings, lists, nested dicts.
        video_mp4: H.264 MP4 bytes of the heatmap through the layers, or None.
        created: ISO 8601 timestamp; it dates the ZIP members, so equal content gives equal bytes.
    """

    title: str
    model_name: str
    original_image: Image.Image
    heatmaps: tuple[tuple[str, Image.Image], ...]
    mask_image: Image.Image | None
    masked_image: Image.Image | None
    captions: dict[str, str]
    diff: list[DiffToken] | None
    metrics: dict[str, Any]
    video_mp4: bytes | None
    created: str

    def __post_init__(self) -> None:
        try:
            created = datetime.fromisoformat(self.created)
        except (TypeError, ValueError) as error:
            raise ValueError(f"created must be an ISO 8601 timestamp, got {self.created!r}") from error
        if not ZIP_FIRST_YEAR <= created.year <= ZIP_LAST_YEAR:
            raise ValueError(f"created must fall in {ZIP_FIRST_YEAR}..{ZIP_LAST_YEAR} (ZIP dates), got {self.created}")
        for pair in self.heatmaps:
            if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], Image.Image):
                raise TypeError(f"heatmaps must hold (label, PIL image) pairs, got {pair!r}")


def report_zip(content: ReportContent) -> bytes:
    """Pack a report into deflated ZIP bytes: images as PNG, captions and metrics as JSON, video, HTML page.

    Args:
        content: what the report shows.

    Returns:
        ZIP bytes with original.png, heatmaps/NN_<slug>.png, mask.png and masked.png (when present),
        captions.json, metrics.json, layers.mp4 (when present) and report.html; identical for equal content.
    """
    images = _encode_images(content)
    members = dict(images)
    members["captions.json"] = _to_json(content.captions).encode("utf-8")
    members["metrics.json"] = _to_json(content.metrics).encode("utf-8")
    if content.video_mp4 is not None:
        members["layers.mp4"] = content.video_mp4
    members["report.html"] = _render_html(content, images).encode("utf-8")

    date_time = datetime.fromisoformat(content.created).timetuple()[:6]
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            # A fixed ZipInfo, not the clock or the platform, decides every header field.
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = ZIP_CREATED_ON_UNIX
            info.external_attr = ZIP_FILE_ATTRIBUTES
            archive.writestr(info, data)
    return buffer.getvalue()


def report_html(content: ReportContent) -> str:
    """Render a report as one self-contained HTML page (images and video as base64 data URIs).

    Args:
        content: what the report shows.

    Returns:
        The page; all user text is escaped and no resource is loaded from outside.
    """
    return _render_html(content, _encode_images(content))


def heatmap_file_name(index: int, label: str) -> str:
    """Name the ZIP member of the index-th heatmap (from 1) after its label, safe on any file system.

    Args:
        index: position of the heatmap in the report, from 1; keeps names unique.
        label: free text, e.g. "BLIP hirescam · vision layer 4/4 · word: circle".

    Returns:
        "heatmaps/NN_<slug>.png", the slug holding only a-z, 0-9 and "-" (so no "..", "/" or "\\").
    """
    ascii_label = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_label.lower()).strip("-")[:SLUG_MAX_LENGTH].rstrip("-")
    return f"heatmaps/{index:02d}_{slug or 'heatmap'}.png"


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested metric dicts into ("a.b", value) rows, in insertion order.

    Args:
        metrics: JSON-like values, nested dicts allowed.
        prefix: key of the enclosing dict, "" at the top.

    Returns:
        (dotted key, leaf value) pairs; leaves are anything but a dict.
    """
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        dotted_key = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            rows.extend(flatten_metrics(value, dotted_key))
        else:
            rows.append((dotted_key, value))
    return rows


def to_json_safe(value: Any) -> Any:
    """Convert numpy scalars and arrays to Python values and non-finite floats (NaN, inf) to None.

    Args:
        value: numbers, strings, booleans, None, lists, tuples, numpy values and dicts of them.

    Returns:
        An equal structure that strict JSON can hold; dict keys become strings.
    """
    if isinstance(value, Mapping):
        return {str(key): to_json_safe(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if isinstance(value, list | tuple):
        return [to_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return to_json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int):
        return value
    raise TypeError(f"cannot write a {type(value).__name__} to JSON: {value!r}")


def _to_json(value: Any) -> str:
    """Serialise to strict, readable JSON (NaN -> null); keys keep the caller's order."""
    return json.dumps(to_json_safe(value), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _encode_images(content: ReportContent) -> dict[str, bytes]:
    """Encode the report's images as PNG, keyed by ZIP member name, in member order."""
    images = {"original.png": to_png_bytes(content.original_image)}
    for index, (label, image) in enumerate(content.heatmaps, start=1):
        images[heatmap_file_name(index, label)] = to_png_bytes(image)
    if content.mask_image is not None:
        images["mask.png"] = to_png_bytes(content.mask_image)
    if content.masked_image is not None:
        images["masked.png"] = to_png_bytes(content.masked_image)
    return images


def _render_html(content: ReportContent, images: Mapping[str, bytes]) -> str:
    """Assemble the page from already encoded PNGs (so the ZIP encodes each image once)."""
    title = html.escape(content.title)
    sections = [
        f"<h1>{title}</h1>",
        f'<p class="meta">Model: <code>{html.escape(content.model_name)}</code> · '
        f"created {html.escape(content.created)}</p>",
        _captions_section(content.captions),
    ]
    if content.diff is not None:
        sections.append(
            "<h2>Caption change</h2>"
            '<p class="meta">Struck through on red: words that disappeared; on green: words that appeared.</p>'
            f'<p class="diff">{diff_html(content.diff)}</p>'
        )
    figures = [_figure(images["original.png"], "Original image")]
    if content.mask_image is not None:
        figures.append(_figure(images["mask.png"], "Mask (white = masked)"))
    if content.masked_image is not None:
        figures.append(_figure(images["masked.png"], "Masked image"))
    sections.append(f'<h2>Images</h2><div class="gallery">{"".join(figures)}</div>')
    if content.heatmaps:
        heatmap_figures = [
            _figure(images[heatmap_file_name(index, label)], label)
            for index, (label, _) in enumerate(content.heatmaps, start=1)
        ]
        sections.append(f'<h2>Heatmaps</h2><div class="gallery">{"".join(heatmap_figures)}</div>')
    if content.video_mp4 is not None:
        sections.append(
            "<h2>Heatmap through the layers</h2><video controls>"
            f'<source src="{_data_uri("video/mp4", content.video_mp4)}" type="video/mp4"></video>'
        )
    sections.append(_metrics_section(content.metrics))
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _captions_section(captions: Mapping[str, str]) -> str:
    """A table of captions, one row per name."""
    rows = "".join(
        f"<tr><th>{html.escape(str(name))}</th><td>{html.escape(str(caption))}</td></tr>"
        for name, caption in captions.items()
    )
    return f"<h2>Captions</h2><table>{rows}</table>"


def _metrics_section(metrics: Mapping[str, Any]) -> str:
    """A two-column table of flattened metrics, or nothing when there are none."""
    rows = "".join(
        f'<tr><th>{html.escape(key)}</th><td class="value">{html.escape(_format_metric(value))}</td></tr>'
        for key, value in flatten_metrics(to_json_safe(metrics))
    )
    return f"<h2>Metrics</h2><table>{rows}</table>" if rows else ""


def _format_metric(value: Any) -> str:
    """Show a JSON-safe metric value compactly: 4 significant digits, long lists cut short."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        shown = [_format_metric(item) for item in value[:METRIC_LIST_ITEMS_SHOWN]]
        if len(value) > METRIC_LIST_ITEMS_SHOWN:
            shown.append(f"… ({len(value)} values)")
        return f"[{', '.join(shown)}]"
    if isinstance(value, Mapping):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _figure(png: bytes, caption: str) -> str:
    """An embedded PNG with its escaped caption (also its alt text)."""
    escaped = html.escape(caption)
    image = f'<img src="{_data_uri("image/png", png)}" alt="{escaped}">'
    return f"<figure>{image}<figcaption>{escaped}</figcaption></figure>"


def _data_uri(mime_type: str, data: bytes) -> str:
    """Embed bytes in a base64 data URI."""
    return f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}"
