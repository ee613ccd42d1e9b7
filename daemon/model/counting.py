"""Count a prompt's tokens without reading more of it than the decision needs.

A prompt is compared with a limit (the model's context). Tokenizing a 900 KB prompt whole costs
seconds of CPU and, in the tokenizer's buffers, hundreds of MB that glibc keeps; all to learn that
it does not fit. So a long text is counted by prefixes cut where a word ends (just before
whitespace): limit + 64 characters first, then a prefix sized from the characters per token seen so
far (25 % over what should hold the limit), at least twice the last one, until a prefix alone holds
more than the limit or the whole text has been counted. Pre-tokenizers (byte-level BPE as in
Qwen/GPT-2/Llama 3, SentencePiece's Metaspace) split at those points, so such a prefix never has
more tokens than the whole text: a prompt that fits is never refused, and it is counted exactly.

The bound, for a refused prompt: the tokenizer reads at most limit + 64 characters when the text
has a token a character or more, and in general at most limit + 64 plus 4 times the shortest
word-end prefix holding more than the limit; never more than the text. A text without whitespace
near a cut is cut mid-word, and that prefix must then exceed limit + 64 tokens.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

MARGIN = 64            # tokens: slack for a cut that has to fall inside a word
HEADROOM = 1.25        # the next prefix aims this far past the limit, at the density seen so far
_WINDOW = 4096         # characters searched back from the cut for a word end
_WORD_END = re.compile(r"\S(?=\s)")


@dataclass(frozen=True)
class Count:
    """A token count: exact, or (exact=False) a lower bound already over the limit."""

    tokens: int
    exact: bool
    chars_read: int  # characters the tokenizer was given in all, for this count


def first_prefix(limit: int) -> int:
    """Characters of the first prefix counted for `limit` (all a refusal reads when tokens are dense)."""
    return limit + MARGIN


def _cut(text: str, size: int) -> tuple[int, bool]:
    """Where to cut `text` near `size`: (index, at a word end)."""
    start = max(0, size - _WINDOW)
    last = None
    for last in _WORD_END.finditer(text, start, size + 1):
        pass
    if last is not None and last.end() > 0:
        return last.end(), True
    return size, False


def count(tokenize: Callable[[str], int], text: str, limit: int | None) -> Count:
    """The tokens of `text` (tokenize returns a count), reading no more than the limit needs."""
    size = first_prefix(limit) if limit is not None else len(text)
    read = 0
    while size < len(text):
        cut, clean = _cut(text, size)
        tokens = tokenize(text[:cut])
        read += cut
        if tokens > limit + (0 if clean else MARGIN):
            return Count(tokens, False, read)
        per_token = cut / max(tokens, 1)
        size = max(2 * size, math.ceil(HEADROOM * (limit + MARGIN) * per_token))
    return Count(tokenize(text), True, read + len(text))
