"""Word-level difference between two captions, and its rendering as an inline-styled HTML fragment.

Words are compared exactly as given (the caller decides on case and punctuation); functions are
pure and never modify their inputs.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from utils.text import escape_markdown

Change = Literal["same", "removed", "added"]
CHANGES: tuple[str, ...] = ("same", "removed", "added")

# Inline styles only: st.markdown(unsafe_allow_html=True) and the standalone report both show them.
CHANGE_STYLES = {
    "same": "",
    "removed": "text-decoration: line-through; background-color: #f8d0d0; color: #7a1010; "
    "padding: 0 0.15em; border-radius: 0.2em;",
    "added": "background-color: #cdeccd; color: #135a13; padding: 0 0.15em; border-radius: 0.2em;",
}

@dataclass(frozen=True)
class DiffToken:
    """One word of a caption diff and whether it is in both captions, only before, or only after."""

    word: str
    change: Change

    def __post_init__(self) -> None:
        if self.change not in CHANGES:
            raise ValueError(f"change must be one of {CHANGES}, got {self.change!r}")


def word_diff(before: Sequence[str], after: Sequence[str]) -> list[DiffToken]:
    """Align two captions word by word; a replaced run becomes its removed words, then its added ones.

    Args:
        before: words of the first caption (e.g. the original), in reading order.
        after: words of the second caption (e.g. after masking), in reading order.

    Returns:
        Tokens in reading order; the "same" and "removed" ones spell ``before``, the "same" and
        "added" ones spell ``after``.
    """
    _check_words(before, "before")
    _check_words(after, "after")
    # autojunk would treat words repeated in long captions as noise and misalign them.
    matcher = difflib.SequenceMatcher(a=list(before), b=list(after), autojunk=False)
    tokens: list[DiffToken] = []
    for operation, before_start, before_end, after_start, after_end in matcher.get_opcodes():
        if operation == "equal":
            tokens.extend(DiffToken(word, "same") for word in before[before_start:before_end])
            continue
        tokens.extend(DiffToken(word, "removed") for word in before[before_start:before_end])
        tokens.extend(DiffToken(word, "added") for word in after[after_start:after_end])
    return tokens


def removed_words(before: Sequence[str], after: Sequence[str]) -> list[str]:
    """List the words of ``before`` left over once each word of ``after`` cancels one equal word.

    Multiset difference: "a red circle and a red square" -> "a red square" removes
    ["circle", "and", "a", "red"] (a word's earliest occurrences are the ones kept).

    Args:
        before: words of the first caption, in reading order.
        after: words of the second caption.

    Returns:
        The surplus words in their order in ``before``; empty when nothing disappeared.
    """
    _check_words(before, "before")
    _check_words(after, "after")
    unmatched_after = Counter(after)
    removed: list[str] = []
    for word in before:
        if unmatched_after[word] > 0:
            unmatched_after[word] -= 1
        else:
            removed.append(word)
    return removed


def diff_html(tokens: Sequence[DiffToken]) -> str:
    """Render diff tokens as one <span> per word: removed struck through on red, added on green.

    Args:
        tokens: the output of word_diff.

    Returns:
        An HTML fragment with inline styles only; every word is escaped, so captions that echo
        user text cannot inject markup (or Streamlit markdown).
    """
    spans = []
    for token in tokens:
        word = escape_markdown(token.word)
        style = CHANGE_STYLES[token.change]
        spans.append(f'<span style="{style}">{word}</span>' if style else f"<span>{word}</span>")
    return " ".join(spans)


def _check_words(words: Sequence[str], name: str) -> None:
    """Refuse a plain string, which difflib would otherwise compare character by character."""
    if isinstance(words, str):
        raise TypeError(f"{name} must be a sequence of words (e.g. caption.split()), not a string")
