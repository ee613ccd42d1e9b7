"""Token log probabilities in OpenAI's shapes: chat's `logprobs.content`, the legacy completions object."""
from __future__ import annotations

import math
from typing import Any

from ..model.tokens import token_bytes

FLOOR = -9999.0  # a token the processors ruled out (-inf) is reported like this, as vLLM does


def _lp(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def _token(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    data = token_bytes(tokenizer, token_id)
    return data.decode("utf-8", errors="replace"), list(data)


def chat(tokenizer: Any, entries: list | None) -> dict | None:
    """{"content": [{token, logprob, bytes, top_logprobs}, …]} for these entries (None: not asked)."""
    if entries is None:
        return None
    content = []
    for token_id, logprob, alternatives in entries:
        text, data = _token(tokenizer, token_id)
        top = []
        for alt_id, alt_lp in alternatives:
            alt_text, alt_data = _token(tokenizer, alt_id)
            top.append({"token": alt_text, "logprob": _lp(alt_lp), "bytes": alt_data})
        content.append({"token": text, "logprob": _lp(logprob), "bytes": data, "top_logprobs": top})
    return {"content": content, "refusal": None}


def legacy(tokenizer: Any, entries: list | None, offset: int = 0) -> dict | None:
    """The /v1/completions logprobs object; text offsets count from `offset`."""
    if entries is None:
        return None
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, logprob, alternatives in entries:
        text, _ = _token(tokenizer, token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(_lp(logprob))
        out["top_logprobs"].append({_token(tokenizer, a)[0]: _lp(lp) for a, lp in alternatives})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
