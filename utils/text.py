"""Caption text: shown literally on a Streamlit page, and its first content word."""

from __future__ import annotations

import string
from collections.abc import Sequence

# Every character that Streamlit's Markdown (CommonMark and GFM, LaTeX between $, emoji
# between colons) or HTML reads as markup. A numeric character reference renders as its
# character in both, so one escape serves st.markdown, element and widget labels, image
# captions and inline HTML alike; '&' goes first by construction (translate is one pass).
MARKUP_CHARACTERS = "&<>\"'\\`*_{}[]()#+-.!|~$:="
_REFERENCES = {ord(character): f"&#{ord(character)};" for character in MARKUP_CHARACTERS}


def escape_markdown(text: str) -> str:
    """``text`` as it must be written so that the page shows it verbatim, with no markup."""
    return text.translate(_REFERENCES)


# English function words a caption may start with but that name nothing in the image, so the
# first word explained skips them. Kept short on purpose: colours, numbers ("two") and
# quantities a map can show ("many", "several") are content and are not here.
FUNCTION_WORDS = frozenset(
    # articles, determiners, possessives and "there"/"here" as in "there is a dog"
    ("a", "an", "the", "this", "that", "these", "those", "there", "here", "some", "any", "each", "every",
     "its", "it", "his", "her", "their", "our", "my", "your")
    # prepositions
    + ("of", "in", "on", "at", "to", "for", "with", "by", "from", "into", "onto", "over", "under", "near",
       "next", "above", "below", "behind", "beside", "between", "through", "across", "along", "around",
       "up", "down", "out", "off", "as")
    # conjunctions
    + ("and", "or", "but", "nor", "so", "than", "then", "while")
    # auxiliaries and copulas
    + ("is", "are", "was", "were", "be", "been", "being", "am", "has", "have", "had", "do", "does", "did",
       "can", "could", "will", "would", "should", "may", "might", "must")
    # pronouns
    + ("i", "you", "he", "she", "we", "they", "me", "him", "us", "them", "who", "what", "which")
)


def first_content_word(words: Sequence[str]) -> int:
    """Index of the first word that names something: not a function word and not punctuation only.

    Args:
        words: the caption's words in order, as shown (any case, possibly with punctuation
            attached, e.g. "dog." or "A").

    Returns:
        The index of the first content word; 0 when every word is a function word or
        punctuation, or when ``words`` is empty.
    """
    for index, word in enumerate(words):
        bare = word.strip(string.punctuation + "“”‘’«»…").casefold()
        if bare and bare not in FUNCTION_WORDS:
            return index
    return 0


# A word's visual reliance at a glance: one bar, from the language prior's threshold up to
# RELIANCE_FULL_BAR_NATS (the image made the word e^4, about 55 times, as likely).
RELIANCE_BARS = "▁▂▃▄▅▆▇█"
RELIANCE_FULL_BAR_NATS = 4.0


def reliance_mark(nats: float, prior_below: float) -> str:
    """"prior" under ``prior_below`` nats, else a bar whose height grows with the reliance."""
    if not nats >= prior_below:  # NaN included
        return "prior"
    share = min((nats - prior_below) / (RELIANCE_FULL_BAR_NATS - prior_below), 1.0)
    return RELIANCE_BARS[round(share * (len(RELIANCE_BARS) - 1))]
