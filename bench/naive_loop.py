"""A naive chat loop, in-process: the whole (or last-5-turns) history re-tokenized and run
through transformers `generate` every turn; unbounded, it is the classic history leak (docs/memory.md).
The baseline bench.fast_turns compares edgechat with."""
from __future__ import annotations

import time

import torch


class NaiveChat:
    """One conversation the naive way; keep_turns None = unbounded history, 5 = the simplest fix
    (after appending the new message, keep the last 2 * 5 messages)."""

    def __init__(self, model, tokenizer, banned: torch.Tensor | None, keep_turns: int | None,
                 new_tokens: int) -> None:
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        class Mask(LogitsProcessor):  # what edgechat does for built-in models: replies are plain text
            def __call__(self, input_ids, scores):
                return scores if banned is None else scores.masked_fill(banned[: scores.shape[-1]], float("-inf"))

        class FirstToken(StoppingCriteria):
            at = 0.0

            def __call__(self, input_ids, scores, **kwargs):
                self.at = self.at or time.perf_counter()
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        self._first_cls, self._criteria_list = FirstToken, StoppingCriteriaList
        self._processors = LogitsProcessorList([Mask()])
        self.model, self.tokenizer = model, tokenizer
        self.keep_turns, self.new_tokens = keep_turns, new_tokens
        self.history: list[dict] = []

    def turn(self, user_text: str) -> dict:
        """One turn; latency, TTFT, prompt and completion tokens."""
        started = time.perf_counter()
        self.history.append({"role": "user", "content": user_text})
        if self.keep_turns is not None:
            self.history = self.history[-2 * self.keep_turns:]
        text = self.tokenizer.apply_chat_template(self.history, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        first = self._first_cls()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                      logits_processor=self._processors,
                                      stopping_criteria=self._criteria_list([first]),
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:]
        reply = self.tokenizer.decode(new, skip_special_tokens=True)
        self.history.append({"role": "assistant", "content": reply})
        latency = time.perf_counter() - started
        return {"latency_s": latency, "ttft_s": first.at - started, "prompt_tokens": int(ids.shape[1]),
                "cached_tokens": 0, "completion_tokens": int(new.shape[0])}
