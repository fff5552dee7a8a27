"""Tests for utils/caption_diff.py: word diff golden cases, multiset removal, escaped HTML."""

from __future__ import annotations

import html
import re
from collections import Counter

import pytest

from utils.caption_diff import DiffToken, diff_html, removed_words, word_diff


def tokens(*pairs: str) -> list[DiffToken]:
    """Build expected tokens from "change:word" strings."""
    return [DiffToken(word, change) for change, word in (pair.split(":", 1) for pair in pairs)]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ("a red circle", "a red circle", tokens("same:a", "same:red", "same:circle")),
        ("a red circle", "a circle", tokens("same:a", "removed:red", "same:circle")),
        ("a red circle", "a blue circle", tokens("same:a", "removed:red", "added:blue", "same:circle")),
        (
            "a big red circle",
            "a small blue circle",
            tokens("same:a", "removed:big", "removed:red", "added:small", "added:blue", "same:circle"),
        ),
        ("a circle", "a circle on grass", tokens("same:a", "same:circle", "added:on", "added:grass")),
        ("", "a circle", tokens("added:a", "added:circle")),
        ("a circle", "", tokens("removed:a", "removed:circle")),
        ("", "", []),
        (
            "a red circle and a red square",
            "a red square",
            # The longest common run is the trailing "a red square", so the leading words go.
            tokens("removed:a", "removed:red", "removed:circle", "removed:and", "same:a", "same:red", "same:square"),
        ),
    ],
    ids=["identical", "removed", "replaced", "replaced-run", "added-at-end", "empty-before", "empty-after",
         "both-empty", "repeated-words"],
)
def test_word_diff_golden(before: str, after: str, expected: list[DiffToken]) -> None:
    assert word_diff(before.split(), after.split()) == expected


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("the the the cat sat on the mat", "the cat sat the mat on the"),
        ("a dog", "two cats and a dog on a sofa"),
        ("x y z x y z", "z y x"),
    ],
)
def test_word_diff_spells_both_captions(before: str, after: str) -> None:
    diff = word_diff(before.split(), after.split())
    assert [token.word for token in diff if token.change != "added"] == before.split()
    assert [token.word for token in diff if token.change != "removed"] == after.split()


def test_word_diff_accepts_tuples_and_leaves_inputs_alone() -> None:
    before, after = ["a", "red", "circle"], ("a", "circle")
    assert word_diff(before, after) == tokens("same:a", "removed:red", "same:circle")
    assert before == ["a", "red", "circle"]


def test_word_diff_refuses_a_plain_string() -> None:
    with pytest.raises(TypeError, match="sequence of words"):
        word_diff("a red circle", ["a", "circle"])


def test_diff_token_refuses_an_unknown_change() -> None:
    with pytest.raises(ValueError, match="change must be one of"):
        DiffToken("red", "deleted")


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ("a red circle and a red square", "a red square", ["circle", "and", "a", "red"]),
        ("a red circle", "a red circle", []),
        ("a red circle", "circle red a", []),
        ("red red red", "red", ["red", "red"]),
        ("a circle", "", ["a", "circle"]),
        ("", "a circle", []),
    ],
)
def test_removed_words_is_a_multiset_difference(before: str, after: str, expected: list[str]) -> None:
    removed = removed_words(before.split(), after.split())
    assert removed == expected
    assert Counter(removed) == Counter(before.split()) - Counter(after.split())


def test_diff_html_styles_each_change() -> None:
    fragment = diff_html(tokens("same:a", "removed:red", "added:blue", "same:circle"))
    spans = fragment.split(" <span")
    assert len(spans) == 4
    assert spans[0] == "<span>a</span>"
    assert "line-through" in spans[1] and ">red</span>" in spans[1]
    assert "line-through" not in spans[2] and "background-color" in spans[2] and ">blue</span>" in spans[2]
    assert spans[3] == ">circle</span>"


def test_diff_html_of_nothing_is_empty() -> None:
    assert diff_html([]) == ""


@pytest.mark.parametrize("change", ["same", "removed", "added"])
def test_diff_html_escapes_every_word(change: str) -> None:
    attacks = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "a&b"]
    fragment = diff_html([DiffToken(word, change) for word in attacks])
    assert "<script" not in fragment.lower()
    assert "<img" not in fragment
    words = re.findall(r"<span[^>]*>(.*?)</span>", fragment)
    assert [html.unescape(word) for word in words] == attacks, "each word shows as written"
    assert not any(set("<>\"&") & set(re.sub(r"&#\d+;", "", word)) for word in words)


def test_diff_html_keeps_markdown_and_latex_literal() -> None:
    # st.markdown would turn these into maths, emoji and bold text.
    fragment = diff_html(tokens("same:$x$", "added::smile:", "removed:**bold**"))
    text = re.sub(r"<[^>]*>", "", fragment)  # the words alone, without the tags and their CSS
    assert not set("$:*") & set(text)
    assert "&#36;x&#36;" in fragment
    assert "&#58;smile&#58;" in fragment
    assert "&#42;&#42;bold&#42;&#42;" in fragment
