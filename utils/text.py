"""Showing model or user text literally on a Streamlit page."""

from __future__ import annotations

# Every character that Streamlit's Markdown (CommonMark and GFM, LaTeX between $, emoji
# between colons) or HTML reads as markup. A numeric character reference renders as its
# character in both, so one escape serves st.markdown, element and widget labels, image
# captions and inline HTML alike; '&' goes first by construction (translate is one pass).
MARKUP_CHARACTERS = "&<>\"'\\`*_{}[]()#+-.!|~$:="
_REFERENCES = {ord(character): f"&#{ord(character)};" for character in MARKUP_CHARACTERS}


def escape_markdown(text: str) -> str:
    """``text`` as it must be written so that the page shows it verbatim, with no markup."""
    return text.translate(_REFERENCES)
