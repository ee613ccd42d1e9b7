"""Stand-ins the session, KV and watchdog tests inject: a clock they move by hand, a cheap token counter."""
from __future__ import annotations


class FakeClock:
    """A clock that stands still until a test moves it (`clock.t += s` or `advance(s)`)."""

    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def count_words(messages) -> int:
    """Cheap stand-in for a chat-template tokenizer: words + 4 per message + 3 for the assistant
    header of the prompt (so not additive over messages)."""
    return 3 + sum(len(m["content"].split()) + 4 for m in messages)
