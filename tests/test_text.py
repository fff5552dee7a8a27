"""Tests for utils/text.py: the one table of markup characters and its two escapes."""

from __future__ import annotations

import html
import re

import pytest

from utils.text import MARKDOWN_CHARACTERS, escape_html, escape_markdown


def test_escape_markdown_puts_a_backslash_before_every_markup_character_and_nothing_else():
    assert escape_markdown("a red dog") == "a red dog"
    assert escape_markdown("**bold** [link](x) <b>") == r"\*\*bold\*\* \[link\]\(x\) \<b\>"
    assert escape_markdown("# 1. $x$ ~y~ `z` a_b \\") == r"\# 1\. \$x\$ \~y\~ \`z\` a\_b \\"
    every = escape_markdown(MARKDOWN_CHARACTERS)
    assert every == "".join(f"\\{character}" for character in MARKDOWN_CHARACTERS)


@pytest.mark.parametrize("text", ["**x**", "[a](b)", "<img src=x>", "\\*", "$1 + $2", "a\\", ""])
def test_escape_markdown_round_trips_through_commonmark_unescaping(text):
    """CommonMark turns a backslash before any ASCII punctuation back into the character: the
    reader sees exactly the original text."""
    unescaped = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", escape_markdown(text))
    assert unescaped == text


def test_escape_html_is_html_escape_plus_references_for_inline_markdown():
    assert escape_html("<script>alert(1)</script>") == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert escape_html("$x$ :smile: **b** ~s~ `c` a_b [l] |t| \\") == (
        "&#36;x&#36; &#58;smile&#58; &#42;&#42;b&#42;&#42; &#126;s&#126; &#96;c&#96; a&#95;b "
        "&#91;l&#93; &#124;t&#124; &#92;"
    )
    # html.escape's own references keep their "#" and ";", so a plain page reads the text back.
    for text in ["it's \"a\" & <b>", "a*b:c$d"]:
        assert html.unescape(escape_html(text)) == text
