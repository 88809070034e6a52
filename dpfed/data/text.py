"""Tokenizers, a vocabulary and padded client arrays for word- and char-level LMs.

Used for the federated language models of "Generative Models for Effective ML on
Private, Decentralized Datasets" (Augenstein et al. 2020). Ids 0..3 are the special
tokens `<pad>`, `<oov>`, `<bos>`, `<eos>`; pad is 0 so zero padding means "no token".

Privacy note: a vocabulary counted over private client text is itself a release of
that text. Build it from text no client wrote (as the text debug demo does with plays held
out of the Shakespeare clients) or account for it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np

PAD, OOV, BOS, EOS = "<pad>", "<oov>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, OOV, BOS, EOS)
PAD_ID, OOV_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))

Tokenizer = Callable[[str], list[str]]

# A word: letters/digits, possibly joined by inner apostrophes ("follow'd", "o'er").
# Anything else that is not whitespace is a token of its own character.
_WORD_OR_SYMBOL = re.compile(r"[^\W_]+(?:'[^\W_]+)*|\S")


def tokenize_words(text: str) -> list[str]:
    """Splits lowercased text into words and single-character punctuation tokens.

    A word is a run of letters or digits that may contain inner apostrophes
    ("follow'd", "o'er"); every other non-space character is its own token, so
    leading/closing quotes and elisions split off: "'Tis well--" gives
    ["'", "tis", "well", "-", "-"].
    """
    return _WORD_OR_SYMBOL.findall(text.lower())


def tokenize_chars(text: str) -> list[str]:
    """Splits text into characters, case kept (the char-level LM tokenizer)."""
    return list(text)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """A fixed token <-> id map; `tokens[i]` is the token of id i.

    The first four tokens are `SPECIAL_TOKENS`; unknown tokens encode to `OOV_ID`.
    """

    tokens: tuple[str, ...]

    def __post_init__(self):
        if self.tokens[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ValueError(f"tokens must start with {SPECIAL_TOKENS}, got {self.tokens[:4]}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("tokens must be unique")

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], max_tokens: int, tokenizer: Tokenizer = tokenize_words
    ) -> Vocabulary:
        """Builds the vocabulary of the `max_tokens` most frequent tokens of `texts`.

        Ties in frequency are broken alphabetically so the result is deterministic.
        Texts are tokenized line by line, as `to_padded_sequences` does.

        Args:
          texts: the texts to count tokens in.
          max_tokens: how many regular tokens to keep; the size is 4 more (specials).
          tokenizer: `tokenize_words` (word LM) or `tokenize_chars` (char LM).
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        counts = collections.Counter(
            token for text in texts for line in text.splitlines() for token in tokenizer(line)
        )
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls(SPECIAL_TOKENS + tuple(token for token, _ in ranked[:max_tokens]))

    @functools.cached_property
    def _ids(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def size(self) -> int:
        """Number of ids, specials included (the LM's output dimension)."""
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """Maps tokens to int32 ids; unknown tokens become `OOV_ID`."""
        return np.array([self._ids.get(t, OOV_ID) for t in tokens], dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Maps ids back to tokens (specials included, e.g. "<oov>")."""
        return [self.tokens[int(i)] for i in ids]


def encode_stream(text: str, vocab: Vocabulary, tokenizer: Tokenizer) -> np.ndarray:
    """Encodes a text as `<bos> line <eos>` for each of its lines, concatenated."""
    pieces = [
        np.concatenate([[BOS_ID], vocab.encode(tokenizer(line)), [EOS_ID]])
        for line in text.splitlines()
        if line.strip()
    ]
    return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)


def to_padded_sequences(
    texts: Sequence[str],
    vocab: Vocabulary,
    seq_len: int,
    *,
    tokenizer: Tokenizer = tokenize_words,
    max_seqs: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Turns per-client texts into padded id arrays for federated LM training.

    Each client's text becomes one id stream (`encode_stream`), cut into consecutive
    windows of `seq_len` ids; the last window is padded with `PAD_ID`. Clients with
    fewer windows are padded with all-`PAD_ID` sequences. A model predicts
    `ids[..., 1:]` from `ids[..., :-1]` and masks targets equal to `PAD_ID`. Windows
    do not overlap, so the first id of every window but the first is never a target
    (1 id in `seq_len`; a window holding only a stream's last `<eos>` predicts nothing).

    Args:
      texts: one text per client.
      vocab: the vocabulary to encode with.
      seq_len: ids per sequence (>= 2).
      tokenizer: `tokenize_words` or `tokenize_chars`; must match the vocabulary.
      max_seqs: sequences per client in the output; defaults to the largest client.
        A client with more sequences is an error: nothing is dropped silently.

    Returns:
      (ids, counts): int32 `[clients, max_seqs, seq_len]` and int32 `[clients]`, the
      number of real (non-padding) sequences of each client.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (an input and a target), got {seq_len}")
    streams = [encode_stream(text, vocab, tokenizer) for text in texts]
    counts = np.array([-(-len(s) // seq_len) for s in streams], dtype=np.int32)
    if max_seqs is None:
        max_seqs = int(counts.max(initial=0))
    if counts.size and counts.max() > max_seqs:
        worst = int(counts.argmax())
        raise ValueError(
            f"max_seqs={max_seqs} is too small: client {worst} has {counts[worst]} "
            f"sequences of seq_len={seq_len}; raise max_seqs or trim its text"
        )
    ids = np.full((len(texts), max_seqs * seq_len), PAD_ID, dtype=np.int32)
    for row, stream in zip(ids, streams, strict=True):
        row[: len(stream)] = stream
    return ids.reshape(len(texts), max_seqs, seq_len), counts
