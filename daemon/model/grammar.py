"""A byte-level pushdown automaton for JSON, optionally shaped by a compiled schema (see schema.py).

A state is an immutable tuple of frames (the top last), so a token can be tried without copying.
Literal alternatives (an enum, const, true/false) are one sorted tuple that every state shares: a
step narrows an index range by bisection, so its cost grows with log(alternatives), not with their
number (a 50,000-value enum costs a 2-value one's steps times ~16).
`step(state, byte)` returns the next state or None; `can_end(state)` tells whether the text so far
is one complete value. Output is compact JSON with at most one space after `:` and `,`.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Any

MAX_DEPTH = 16  # nesting of free objects and arrays (json_object)
MAX_NUMBER = 24  # bytes in one number
ANY = ("any",)
OBJECT = ("freeobj",)

_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_NUMBER_END = frozenset((2, 3, 5, 8))  # number phases where the number may end

State = tuple


def start(root: tuple, prefix: bytes = b"", suffix: bytes = b"") -> State:
    """The state before any byte: optional literal prefix, one value of `root`, optional suffix."""
    frames: list = []
    if suffix:
        frames.append(("A", (suffix,), 0))
    frames.append(("V", root, 0))
    if prefix:
        frames.append(("A", (prefix,), 0))
    return tuple(frames)


def step(state: State, byte: int) -> State | None:
    """The state after one more byte, or None when the byte cannot come next."""
    while state:
        top, rest = state[-1], state[:-1]
        result = _STEP[top[0]](top, byte)
        if result is None:
            return None
        kind, frames = result
        if kind == "ok":
            return rest + frames
        if kind == "redo":  # the top frame became these; feed them the same byte
            state = rest + frames
        else:  # "end": the top frame is complete and does not take the byte
            state = rest
    return None


def can_end(state: State) -> bool:
    """True when the bytes so far form the whole document."""
    for frame in reversed(state):
        kind = frame[0]
        if kind == "WS":
            continue
        if kind == "N" and frame[2] in _NUMBER_END:
            continue
        if kind == "A" and any(len(a) == frame[2] for a in frame[1]):
            continue
        if kind == "R" and len(frame[1][frame[2]]) == frame[4]:  # the shortest sorts first
            continue
        return False
    return True


def feed(state: State | None, data: bytes) -> State | None:
    """Step over several bytes (None once any fails)."""
    for byte in data:
        if state is None:
            return None
        state = step(state, byte)
    return state


def _value(frame: tuple, byte: int):
    node, depth = frame[1], frame[2]
    kind = node[0]
    if kind == "any":
        if byte == 0x7B:
            return ("redo", (("V", OBJECT, depth),))
        if byte == 0x5B:
            return ("redo", (("V", ("array", ANY, 0, None), depth),))
        if byte == 0x22:
            return ("redo", (("V", ("string", 0, None), depth),))
        if byte == 0x2D or byte in _DIGITS:
            return ("redo", (("N", False, 0, 0),))
        lit = {0x74: b"true", 0x66: b"false", 0x6E: b"null"}.get(byte)
        return ("ok", (("A", (lit,), 1),)) if lit else None
    if kind == "freeobj":
        if byte != 0x7B or depth >= MAX_DEPTH:
            return None
        return ("ok", (("FO", "first", depth + 1),))
    if kind == "object":  # every property, in the schema's order
        if byte != 0x7B:
            return None
        frames: list = [("A", (b"}",), 0)]
        for i, (key, child) in reversed(list(enumerate(node[1]))):
            frames += [("V", child, depth + 1), ("WS",), ("A", (key,), 0)]
            if i:
                frames += [("WS",), ("A", (b",",), 0)]
        return ("ok", tuple(frames))
    if kind == "array":
        if byte != 0x5B or depth >= MAX_DEPTH:
            return None
        return ("ok", (("AR", node, 0, "first", depth + 1),))
    if kind == "string":
        return ("ok", (("S", 0, node[1], node[2], 0, 0),)) if byte == 0x22 else None
    if kind == "number":
        return ("redo", (("N", node[1], 0, 0),)) if byte == 0x2D or byte in _DIGITS else None
    if kind == "alts":  # node[1]: sorted, distinct (see literals())
        return ("redo", (("R", node[1], 0, len(node[1]), 0),))
    if kind == "anyof":  # branches start with different bytes (schema.py checks)
        for branch in node[1]:
            if byte in first_bytes(branch):
                return ("redo", (("V", branch, depth),))
        return None
    if kind == "choice":  # literal heads, each followed by its own value (tool calls)
        return ("redo", (("C", node[1], 0, depth),))
    raise ValueError(f"unknown grammar node {kind!r}")


def first_bytes(node: tuple) -> frozenset[int]:
    """Bytes a value of this node may start with."""
    kind = node[0]
    if kind == "any":
        return frozenset(b'{["-tfn') | _DIGITS
    if kind in ("freeobj", "object"):
        return frozenset(b"{")
    if kind == "array":
        return frozenset(b"[")
    if kind == "string":
        return frozenset(b'"')
    if kind == "number":
        return frozenset(b"-") | _DIGITS
    if kind == "alts":
        return frozenset(a[0] for a in node[1] if a)
    if kind == "choice":
        return frozenset(head[0] for head, _ in node[1] if head)
    return frozenset().union(*(first_bytes(b) for b in node[1]))


def _alts(frame: tuple, byte: int):
    alts, pos = frame[1], frame[2]
    going = tuple(a for a in alts if len(a) > pos and a[pos] == byte)
    if going:
        return ("ok", (("A", going, pos + 1),))
    return ("end", ()) if any(len(a) == pos for a in alts) else None


def literals(values) -> tuple:
    """The "alts" node for these literal byte strings (sorted and distinct, as _range needs)."""
    return ("alts", tuple(sorted(set(values))))


def _range(frame: tuple, byte: int):
    """Literals lits[lo:hi] share their first `pos` bytes; those going on with `byte` are a sub-range."""
    _, lits, lo, hi, pos = frame
    prefix = lits[lo][:pos]
    start = bisect_left(lits, prefix + bytes((byte,)), lo, hi)
    stop = bisect_left(lits, prefix + bytes((byte + 1,)), start, hi) if byte < 255 else hi
    if start < stop:
        return ("ok", (("R", lits, start, stop, pos + 1),))
    return ("end", ()) if len(lits[lo]) == pos else None


def _choice(frame: tuple, byte: int):
    heads, pos, depth = frame[1], frame[2], frame[3]
    going = tuple((h, n) for h, n in heads if len(h) > pos and h[pos] == byte)
    if not going:
        return None
    done = [n for h, n in going if len(h) == pos + 1]
    if done:  # heads are prefix-free: the one that ended is the only one left
        return ("ok", (("V", done[0], depth),))
    return ("ok", (("C", going, pos + 1, depth),))


def _space(frame: tuple, byte: int):
    return ("ok", ()) if byte == 0x20 else ("end", ())


def _free_object(frame: tuple, byte: int):
    phase, depth = frame[1], frame[2]
    key = ("V", ("string", 0, None), depth)
    if phase in ("first", "key") and byte == 0x22:
        return ("redo", (("FO", "colon", depth), key))
    if phase in ("first", "next") and byte == 0x7D:
        return ("ok", ())
    if phase == "colon" and byte == 0x3A:
        return ("ok", (("FO", "next", depth), ("V", ANY, depth), ("WS",)))
    if phase == "next" and byte == 0x2C:
        return ("ok", (("FO", "key", depth), ("WS",)))
    return None


def _array(frame: tuple, byte: int):
    node, count, phase, depth = frame[1], frame[2], frame[3], frame[4]
    item, low, high = node[1], node[2], node[3]
    if byte == 0x5D and count >= low:
        return ("ok", ())
    if phase == "first" and (high is None or high > 0):
        return ("redo", (("AR", node, 1, "next", depth), ("V", item, depth)))
    if phase == "next" and byte == 0x2C and (high is None or count < high):
        return ("ok", (("AR", node, count + 1, "next", depth), ("V", item, depth), ("WS",)))
    return None


def _string(frame: tuple, byte: int):
    _, count, low, high, esc, pending = frame
    if pending:  # continuation bytes of a multi-byte UTF-8 character
        return ("ok", (("S", count, low, high, 0, pending - 1),)) if 0x80 <= byte <= 0xBF else None
    if esc == 1:
        if byte == 0x75:
            return ("ok", (("S", count, low, high, 14, 0),))
        return ("ok", (("S", count + 1, low, high, 0, 0),)) if byte in _ESCAPES else None
    if esc > 10:  # \u and its four hex digits
        if byte not in _HEX:
            return None
        return ("ok", (("S", count + (esc == 11), low, high, 0 if esc == 11 else esc - 1, 0),))
    if byte == 0x22:
        return ("ok", ()) if count >= low else None
    if byte < 0x20 or (high is not None and count >= high):
        return None
    if byte == 0x5C:
        return ("ok", (("S", count, low, high, 1, 0),))
    if byte < 0x80:
        return ("ok", (("S", count + 1, low, high, 0, 0),))
    extra = 1 if 0xC2 <= byte <= 0xDF else 2 if 0xE0 <= byte <= 0xEF else 3 if 0xF0 <= byte <= 0xF4 else 0
    return ("ok", (("S", count + 1, low, high, 0, extra),)) if extra else None


# number phases: 0 start, 1 after '-', 2 leading zero, 3 integer digits, 4 after '.',
# 5 fraction digits, 6 after 'e', 7 after the exponent's sign, 8 exponent digits
def _number(frame: tuple, byte: int):
    _, integer, phase, length = frame
    nxt = None
    digit = byte in _DIGITS
    if length < MAX_NUMBER:
        if phase == 0 and byte == 0x2D:
            nxt = 1
        elif phase in (0, 1) and digit:
            nxt = 2 if byte == 0x30 else 3
        elif phase in (3, 5, 8) and digit:
            nxt = phase
        elif phase in (4, 6, 7) and digit:
            nxt = {4: 5, 6: 8, 7: 8}[phase]
        elif phase in (2, 3) and byte == 0x2E and not integer:
            nxt = 4
        elif phase in (2, 3, 5) and byte in b"eE" and not integer:
            nxt = 6
        elif phase == 6 and byte in b"+-":
            nxt = 7
    if nxt is not None:
        return ("ok", (("N", integer, nxt, length + 1),))
    return ("end", ()) if phase in _NUMBER_END else None


_STEP: dict[str, Any] = {"V": _value, "A": _alts, "R": _range, "C": _choice, "WS": _space, "FO": _free_object,
                         "AR": _array, "S": _string, "N": _number}
