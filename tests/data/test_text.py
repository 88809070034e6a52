"""Tests of the tokenizers, the vocabulary and padded client sequences."""

import numpy as np
import pytest

from dpfed.data import text


def test_tokenize_words_lowercases_and_splits_punctuation():
    tokens = text.tokenize_words("'Tis FOLLOW'D, sir--o'er!")
    assert tokens == ["'", "tis", "follow'd", ",", "sir", "-", "-", "o'er", "!"], f"{tokens}"


def test_tokenize_chars_keeps_case_and_spaces():
    assert text.tokenize_chars("Ab c") == ["A", "b", " ", "c"], "char tokens wrong"


def test_vocabulary_keeps_top_tokens_after_specials():
    vocab = text.Vocabulary.from_texts(["b a a\nc b a"], max_tokens=2)
    assert vocab.tokens == ("<pad>", "<oov>", "<bos>", "<eos>", "a", "b"), f"{vocab.tokens}"
    assert vocab.size == 6 == len(vocab), f"size {vocab.size}"


def test_vocabulary_breaks_ties_alphabetically():
    vocab = text.Vocabulary.from_texts(["z y x"], max_tokens=2)
    assert vocab.tokens[4:] == ("x", "y"), f"tie order {vocab.tokens[4:]}"


def test_encode_maps_unknown_to_oov_and_decode_inverts():
    vocab = text.Vocabulary.from_texts(["to be or not"], max_tokens=10)
    ids = vocab.encode(["to", "be", "hamlet"])
    assert ids.dtype == np.int32 and ids[-1] == text.OOV_ID, f"ids {ids}"
    assert vocab.decode(ids) == ["to", "be", "<oov>"], f"decoded {vocab.decode(ids)}"


def test_padded_sequences_wrap_lines_and_pad_with_zeros():
    vocab = text.Vocabulary.from_texts(["a b"], max_tokens=2)  # a=4, b=5
    ids, counts = text.to_padded_sequences(["a b\nb", "a"], vocab, seq_len=4)
    bos, eos = text.BOS_ID, text.EOS_ID
    expected = [
        [[bos, 4, 5, eos], [bos, 5, eos, 0]],
        [[bos, 4, eos, 0], [0, 0, 0, 0]],
    ]
    assert ids.tolist() == expected, f"ids {ids.tolist()}"
    assert counts.tolist() == [2, 1] and ids.dtype == counts.dtype == np.int32, f"{counts}"


def test_padded_sequences_refuse_to_drop_text():
    vocab = text.Vocabulary.from_texts(["a"], max_tokens=1)
    with pytest.raises(ValueError, match="max_seqs"):
        text.to_padded_sequences(["a a a a a"], vocab, seq_len=2, max_seqs=1)


def test_char_level_sequences_use_char_vocabulary():
    vocab = text.Vocabulary.from_texts(["abba"], max_tokens=5, tokenizer=text.tokenize_chars)
    ids, _ = text.to_padded_sequences(["ab"], vocab, 4, tokenizer=text.tokenize_chars)
    assert vocab.decode(ids[0, 0]) == ["<bos>", "a", "b", "<eos>"], f"{vocab.decode(ids[0, 0])}"


def test_blank_lines_add_no_tokens():
    vocab = text.Vocabulary.from_texts(["a"], max_tokens=1)  # a=4
    ids = text.encode_stream("a\n\n  \na", vocab, text.tokenize_words)
    bos, eos = text.BOS_ID, text.EOS_ID
    assert ids.tolist() == [bos, 4, eos, bos, 4, eos], f"blank lines became sequences: {ids}"


def test_char_vocabulary_counts_tokens_line_by_line():
    vocab = text.Vocabulary.from_texts(
        ["ab\nab\nab"], max_tokens=10, tokenizer=text.tokenize_chars)
    assert "\n" not in vocab.tokens, (
        f"a line break is never encoded, yet took a slot: {vocab.tokens}")
