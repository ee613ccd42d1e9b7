"""Bounded token counting: a prompt that fits is counted exactly, one that does not is refused early."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from daemon.model import counting as tokens


def words_tokenizer(seen: list[int]):
    """A pre-tokenizing stand-in: one token per word, two per word of 8+ characters; records reads."""
    def tokenize(text: str) -> int:
        seen.append(len(text))
        return sum(1 + (len(w) >= 8) for w in text.split())
    return tokenize


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.text(alphabet="ab \n\u00e9\u65e5", max_size=30), max_size=60), st.integers(1, 40))
def test_never_refuses_a_text_that_fits_and_counts_it_exactly(parts, limit):
    text = " ".join(parts)
    exact = words_tokenizer([])(text)
    found = tokens.count(words_tokenizer([]), text, limit)
    if exact <= limit:
        assert found.exact and found.tokens == exact
    else:
        assert found.tokens > limit and found.tokens <= exact


@pytest.mark.parametrize("text,chars_per_token", [("x " * 450_000, 2), ("word " * 200_000, 5),
                                                  ("abcdefghij " * 90_000, 5.5)])
def test_a_huge_prompt_is_refused_after_reading_a_bounded_prefix(text, chars_per_token):
    limit, seen = 1000, []
    found = tokens.count(words_tokenizer(seen), text, limit)
    assert not found.exact and found.tokens > limit
    assert sum(seen) == found.chars_read
    needed = (limit + 1) * chars_per_token  # the shortest prefix over the limit, about
    assert found.chars_read <= tokens.first_prefix(limit) + 4 * needed
    assert found.chars_read < len(text) / 50


def test_a_text_without_spaces_is_cut_mid_word_with_a_margin():
    seen = []

    def per_char(text):
        seen.append(len(text))
        return len(text)
    found = tokens.count(per_char, "x" * 100_000, 1000)
    assert not found.exact and found.tokens > 1000 + tokens.MARGIN and sum(seen) < 10_000


def test_no_limit_counts_everything():
    seen = []
    assert tokens.count(words_tokenizer(seen), "a b c", None) == tokens.Count(3, True, 5)
