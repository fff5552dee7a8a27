"""Whole caption words from three kinds of tokenizer, all built offline."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from models.explainer import caption_words
from tests.tiny_models import tiny_tokenizer

CORPUS = ["a red circle and a blue square.", "a green triangle above two red circles."] * 20
SENTENCE = "a red circles and blue squares."
WORDS = ["a", "red", "circles", "and", "blue", "squares", "."]
SPECIAL = ["<s>", "</s>", "<pad>", "<unk>"]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 / Qwen style: pieces carry their leading space as "Ġ"."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def sentencepiece_unigram() -> PreTrainedTokenizerFast:
    """Llama / T5 style: "▁" marks a word start, and may stand alone as a piece."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=40, special_tokens=SPECIAL, unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.mark.parametrize("build", [byte_level_bpe, sentencepiece_unigram], ids=["byte-level BPE", "SentencePiece"])
def test_words_and_piece_spans_from_the_tokenizers_own_decoding(build):
    tokenizer = build()
    prompt_ids = tokenizer("describe:", add_special_tokens=False).input_ids
    answer_ids = tokenizer(" " + SENTENCE, add_special_tokens=False).input_ids
    token_ids = [tokenizer.bos_token_id, *prompt_ids, *answer_ids, tokenizer.eos_token_id]
    first = 1 + len(prompt_ids)
    words = caption_words(tokenizer, token_ids, first, set(tokenizer.all_special_ids))
    assert [word.text for word in words] == WORDS
    pieces = tokenizer.convert_ids_to_tokens(token_ids)
    assert len(pieces[first:-1]) > len(WORDS), "the test needs words split into several pieces"
    # Every answer piece belongs to exactly one word, in order, and no prompt or special token does.
    covered = [position for word in words for position in range(word.start, word.end)]
    assert covered == list(range(first, len(token_ids) - 1))
    for word in words:
        spelled = tokenizer.decode(token_ids[word.start : word.end]).strip()
        assert spelled == word.text


def test_wordpiece_merges_hash_pieces_and_skips_bos_and_sep():
    tokenizer = tiny_tokenizer()
    vocabulary = tokenizer.get_vocab()
    token_ids = [vocabulary["[DEC]"]] + [vocabulary[p] for p in ["a", "red", "dog", "##s", "and", "blue"]]
    token_ids.append(vocabulary["[SEP]"])
    special = {vocabulary["[DEC]"], vocabulary["[SEP]"]}
    words = caption_words(tokenizer, token_ids, 1, special)
    assert [(word.text, word.start, word.end) for word in words] == [
        ("a", 1, 2), ("red", 2, 3), ("dogs", 3, 5), ("and", 5, 6), ("blue", 6, 7),
    ]


def test_no_word_before_the_first_position():
    tokenizer = tiny_tokenizer()
    vocabulary = tokenizer.get_vocab()
    token_ids = [vocabulary[p] for p in ["[DEC]", "a", "picture", "of", "a", "cat", "[SEP]"]]
    words = caption_words(tokenizer, token_ids, 4, {vocabulary["[DEC]"], vocabulary["[SEP]"]})
    assert [word.text for word in words] == ["a", "cat"]
    assert words[0].start == 4
