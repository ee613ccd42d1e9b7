"""What each token id spells, as bytes: logprobs report it, constrained decoding matches on it."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table used by ByteLevel tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer: Any, token_id: int, token: str | None = None) -> bytes:
    """The bytes one token adds to the text: ByteLevel tokens map back byte for byte, added and
    other tokens by decoding them alone."""
    if token is None:
        token = tokenizer.convert_ids_to_tokens(token_id)
    if token is None:
        return b""
    table = byte_decoder()
    if token_id not in tokenizer.added_tokens_decoder and all(c in table for c in token):
        return bytes(table[c] for c in token)
    return tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")


class TokenTable:
    """Bytes of every token the model may produce (banned rows spell nothing), built once per engine."""

    def __init__(self, tokenizer: Any, rows: int, banned: torch.Tensor | None) -> None:
        count = min(len(tokenizer), rows)
        names = tokenizer.convert_ids_to_tokens(list(range(count)))
        self.spelled: list[bytes] = [b""] * rows
        for token_id, name in enumerate(names):
            if banned is None or not bool(banned[token_id]):
                self.spelled[token_id] = token_bytes(tokenizer, token_id, name)
        # the first byte of each token (-1: none), for a vectorised first-byte prefilter
        self.first = torch.tensor([b[0] if b else -1 for b in self.spelled], dtype=torch.int16)
        self.rows = rows
