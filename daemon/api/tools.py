"""Tool calling as Qwen2.5's chat template defines it: tools rendered by the template, replies'
<tool_call>{"name": …, "arguments": …}</tool_call> blocks turned into OpenAI tool_calls."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import invalid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolRequest:
    """The tools of a request and what tool_choice asks: "auto", "none", "required" or a name."""

    tools: list[dict]
    choice: str
    parallel: bool

    @property
    def rendered(self) -> list[dict] | None:
        """What the chat template gets as `tools` (none when tool_choice is "none")."""
        return self.tools if self.tools and self.choice != "none" else None

    @property
    def forced(self) -> str | None:
        """The function the reply must call, "" for any, None when the model chooses."""
        if self.choice in ("auto", "none"):
            return None
        return "" if self.choice == "required" else self.choice


def request(body: dict, template: str | None) -> ToolRequest | None:
    """Validate tools, tool_choice and parallel_tool_calls; None when no tools were sent."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise invalid("'tool_choice' needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise invalid(f"'tools' must be a list of 1..{MAX_TOOLS} tools", "tools", "invalid_type")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise invalid(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{…}}}}",
                          f"tools[{i}]", "invalid_type")
        if not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise invalid(f"'tools[{i}].function.name' must be 1-64 letters, digits, _ or -",
                          f"tools[{i}].function.name")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise invalid(f"'tools[{i}].function.parameters' must be a JSON schema object",
                          f"tools[{i}].function.parameters", "invalid_type")
    if not template or "tools" not in template:
        raise invalid("this model's chat template does not render tools", "tools",
                      "unsupported_parameter")
    names = {t["function"]["name"] for t in tools}
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise invalid("'tool_choice' names no tool of this request", "tool_choice")
        choice = name
    elif choice not in ("auto", "none", "required"):
        raise invalid("'tool_choice' must be none, auto, required or a named function", "tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", "invalid_type")
    return ToolRequest(tools, choice, parallel is not False)


def history_calls(calls: Any, param: str) -> list[dict]:
    """An assistant message's tool_calls, as the template wants them (arguments as an object)."""
    if not isinstance(calls, list):
        raise invalid(f"'{param}' must be a list", param, "invalid_type")
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"'{param}[{i}].function' must name a function", f"{param}[{i}].function",
                          "invalid_type")
        arguments = fn.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            raise invalid(f"'{param}[{i}].function.arguments' must be a JSON string",
                          f"{param}[{i}].function.arguments") from None
        out.append({"type": "function", "id": call.get("id"),
                    "function": {"name": fn["name"], "arguments": parsed}})
    return out


def _call(block: str, names: set[str]) -> dict | None:
    """One <tool_call> block's JSON as an OpenAI tool call, or None when it is not one."""
    try:
        data = json.loads(block)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"],
                         "arguments": arguments if isinstance(arguments, str)
                         else json.dumps(arguments, ensure_ascii=False)}}


def split(text: str, req: ToolRequest) -> tuple[str, list[dict]]:
    """(content without the parsed blocks, tool calls); blocks that do not parse stay content."""
    names = {t["function"]["name"] for t in req.tools}
    calls, kept, last = [], [], 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1), names)
        if call is None or (calls and not req.parallel):
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    return "".join(kept).strip() if calls else text, calls


class StreamSplitter:
    """Streams content deltas while holding back anything that may be a <tool_call> block."""

    def __init__(self, req: ToolRequest) -> None:
        self._req = req
        self._held = ""
        self.calls: list[dict] = []

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        """(content to send now, tool calls completed by this piece)."""
        self._held += piece
        out, new = [], []
        while True:
            start = self._held.find(OPEN)
            if start < 0:
                keep = _partial(self._held, OPEN)
                out.append(self._held[:len(self._held) - keep])
                self._held = self._held[len(self._held) - keep:]
                break
            out.append(self._held[:start])
            end = self._held.find(CLOSE, start)
            if end < 0:
                self._held = self._held[start:]
                break
            block = self._held[start:end + len(CLOSE)]
            self._held = self._held[end + len(CLOSE):]
            _, calls = split(block, self._req)
            if calls and (self._req.parallel or not self.calls):
                self.calls += calls
                new += calls
            else:
                out.append(block)
        return "".join(out), new

    def finish(self) -> str:
        """Whatever was held back (an unfinished block is content)."""
        rest, self._held = self._held, ""
        return rest


def _partial(text: str, marker: str) -> int:
    """Length of the longest tail of text that begins marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
