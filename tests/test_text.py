"""Model and user text shown literally: the one escape, and figure titles."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

from utils.metrics import Curve, CurveSet
from utils.plots import curves_figure, log_prob_change_figure
from utils.text import FUNCTION_WORDS, MARKUP_CHARACTERS, escape_markdown, first_content_word


@pytest.mark.parametrize(
    "text",
    ["**bold**", "[x](javascript:alert(1))", "$x^2$", ":smile:", "<img src=x onerror=alert(1)>", "a&b", "# title",
     "1. item", "~~gone~~", "`code`", "a_b_c", "\\*", "&#42;", "plain words"],
)
def test_escaped_text_reads_back_as_written_and_holds_no_markup_character(text):
    escaped = escape_markdown(text)
    assert html.unescape(escaped) == text
    assert not set(MARKUP_CHARACTERS) & set(re.sub(r"&#\d+;", "", escaped))


def test_plain_words_are_left_alone():
    assert escape_markdown("a red circle") == "a red circle"


def test_a_word_in_a_figure_title_is_not_read_as_mathtext():
    fractions = np.linspace(0, 1, 5)
    curve = Curve("deletion", fractions, np.ones(5), 1.0)
    figure = curves_figure(CurveSet(curve, curve, curve, curve), "$x$")
    titles = [axes.title for axes in figure.axes]
    assert all("“$x$”" in title.get_text() and not title.get_parse_math() for title in titles)


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["a", "red", "circle"], 1),
        (["there", "is", "a", "dog"], 3),
        (["A", "Dog", "on", "grass"], 1),  # capitals are the same words
        (["two", "cats"], 0),  # a number is content
        (["an", "empty", "picture"], 1),
        (["this", "is", "an", "image", "of", "a", "cat"], 3),
        ([",", "the", "--", "blue", "square"], 3),  # punctuation-only words are skipped
        (["“the", "dog.”"], 1),  # punctuation attached to a word is not part of it
        (["a", "the"], 0),
        (["of", ".", "..."], 0),
        ([], 0),
    ],
)
def test_first_content_word_skips_function_words_and_punctuation(words, expected):
    assert first_content_word(words) == expected


def test_first_content_word_accepts_any_sequence_and_leaves_it_alone():
    words = ("there", "are", "two", "dogs")
    assert first_content_word(words) == 2
    assert words == ("there", "are", "two", "dogs")


def test_function_words_are_lower_case_single_words():
    assert all(word == word.casefold() and word.isalpha() for word in FUNCTION_WORDS)
    assert not {"red", "two", "dog", "circle", "picture"} & FUNCTION_WORDS


def test_words_on_the_log_p_bars_are_not_read_as_mathtext():
    figure = log_prob_change_figure(["1. $x$", "2. dog"], [-1.5, 0.2])
    (axes,) = figure.axes
    labels = axes.get_xticklabels()
    assert [label.get_text() for label in labels] == ["1. $x$", "2. dog"]
    assert not any(label.get_parse_math() for label in labels)
    assert [round(bar.get_height(), 2) for bar in axes.patches] == [-1.5, 0.2]
