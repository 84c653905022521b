"""The Qwen2.5 / Hermes tool-call format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

A model that calls a tool writes one such block per call, before or after ordinary text.
``HermesToolParser`` cuts the blocks out of a stream of text as it arrives (the streamed
response), and ``parse_tool_calls`` out of a whole output; both give the same content and
calls, wherever the stream's pieces begin and end.
"""

from __future__ import annotations

import json
from typing import Any

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


class HermesToolParser:
    """Cuts ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks out of a stream of text.

    ``feed`` takes each new piece of text and returns what can be said for sure: content
    (text outside the blocks, less any tail that may be the start of ``<tool_call>``) and
    complete calls. ``finish`` flushes the rest at the end. A block whose JSON is not a call
    is given back as content, tags included. Once a call has been made, whitespace between
    calls is dropped.
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.in_call = False
        self.calls: list[dict[str, Any]] = []  # every call so far, each {"name", "arguments"}

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += text
        content, calls = "", []
        while True:
            if self.in_call:
                end = self.buffer.find(TOOL_CALL_END)
                if end < 0:
                    break
                body, self.buffer = self.buffer[:end], self.buffer[end + len(TOOL_CALL_END) :]
                self.in_call = False
                call = parse_call(body)
                if call is None:
                    content += f"{TOOL_CALL_START}{body}{TOOL_CALL_END}"
                else:
                    calls.append(call)
                    self.calls.append(call)
            else:
                start = self.buffer.find(TOOL_CALL_START)
                if start < 0:
                    sure = self.buffer[: len(self.buffer) - _partial_tag_length(self.buffer)]
                    if self._between_calls(sure):
                        break  # held: whitespace, unless more text follows
                    content += sure
                    self.buffer = self.buffer[len(sure) :]
                    break
                if not self._between_calls(self.buffer[:start]):
                    content += self.buffer[:start]
                self.buffer = self.buffer[start + len(TOOL_CALL_START) :]
                self.in_call = True
        return content, calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The end of the text: an unclosed block that holds a call is a call; anything else is content."""
        rest, self.buffer = self.buffer, ""
        if not self.in_call:
            return ("" if self._between_calls(rest) else rest), []
        self.in_call = False
        call = parse_call(rest)
        if call is None:
            return TOOL_CALL_START + rest, []
        self.calls.append(call)
        return "", [call]

    def _between_calls(self, text: str) -> bool:
        """Whether ``text`` is only whitespace after a call: dropped, not content."""
        return bool(self.calls) and not text.strip()


def _partial_tag_length(text: str) -> int:
    """How many characters at the end of ``text`` could begin ``<tool_call>``."""
    for n in range(min(len(text), len(TOOL_CALL_START) - 1), 0, -1):
        if TOOL_CALL_START.startswith(text[-n:]):
            return n
    return 0


def parse_call(body: str) -> dict[str, Any] | None:
    """``{"name", "arguments"}`` (arguments as JSON text) from a block's JSON; None if it is no call."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The content and the calls of a whole output in the Hermes format."""
    parser = HermesToolParser()
    content, calls = parser.feed(text)
    more_content, more_calls = parser.finish()
    content, calls = content + more_content, calls + more_calls
    return (content if content.strip() or not calls else None), calls
