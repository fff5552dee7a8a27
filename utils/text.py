"""Model or user text shown literally: no Markdown or HTML in it takes effect. Pure functions.

One table of the characters that Markdown (with Streamlit's ``$maths$``, ``~strike~`` and
``:emoji:``) or HTML read as markup, and two ways out of it: a backslash before each, for text
that ``st.markdown`` renders; numeric character references, for text inside an HTML fragment
that both ``st.markdown(unsafe_allow_html=True)`` and a plain HTML page show (a plain page would
show the backslashes).
"""

from __future__ import annotations

import html

# Every character that starts or ends Markdown or HTML markup somewhere.
MARKDOWN_CHARACTERS = "\\`*_{}[]()#+-.!<>|~$"
# Inside an HTML fragment fewer need a reference: html.escape takes < > & " ' (and its own
# references hold "#", which must stay as it is), the fragment's text never starts a line (so
# + - . ! start no list), a link needs its "[", and () {} alone mean nothing. ":" does need one
# there: Streamlit reads :name: as an emoji.
INLINE_HTML_REFERENCES = {
    ord(character): f"&#{ord(character)};"
    for character in MARKDOWN_CHARACTERS + ":"
    if character not in "<>{}()#+-.!"
}


def escape_markdown(text: str) -> str:
    """Show model or user text literally: no Markdown or HTML from it reaches the page."""
    return "".join(f"\\{character}" if character in MARKDOWN_CHARACTERS else character for character in text)


def escape_html(text: str) -> str:
    """Text for an HTML fragment that st.markdown and a plain HTML page both show literally:
    html.escape, then a numeric reference for each inline Markdown character (``$``, ``:``, ``*`` ...)."""
    return html.escape(text).translate(INLINE_HTML_REFERENCES)
