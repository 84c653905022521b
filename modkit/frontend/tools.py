"""Tool calls on chat: ``tools`` and ``tool_choice``, in the Qwen2.5 / Hermes ``<tool_call>`` format.

The tools go to the model through its chat template (Qwen2.5's takes ``tools``; for a
template that does not, such as the embedded model's, ``render_tools`` writes them into the
system message in the same format). What comes back depends on ``tool_choice``, as in vLLM:

- ``"none"``: plain text; nothing is parsed.
- ``"auto"`` (the default when tools are given): the model writes text and/or calls, each as
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; ``hermes.HermesToolParser`` cuts them
  out of the text into ``tool_calls`` (``finish_reason: "tool_calls"``), streamed or not.
  Nothing forces the model to call, or to call well: a call whose JSON does not parse stays text.
- ``"required"``: the grammar forces a JSON list of calls, ``[{"name": ..., "parameters": {...}}]``,
  each valid against its function's schema (one call only if ``parallel_tool_calls`` is false).
- a named function (``{"type": "function", "function": {"name": ...}}``): the grammar forces
  that function's arguments, a JSON object valid against its ``parameters``; ``finish_reason``
  stays ``"stop"``.

The grammars of the last two are vLLM's, in compact JSON (no free whitespace).

Streamed calls take vLLM's delta shape: a call's first delta carries its ``index``, ``id``,
``type`` and ``function.name``; its ``function.arguments`` may come whole or in pieces.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modkit.frontend.hermes import TOOL_CALL_END, TOOL_CALL_START, HermesToolParser, parse_call, parse_tool_calls
from modkit.sampling_params import SamplingParamsError, StructuredOutputsParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FUNCTION_NAME = r"^[a-zA-Z0-9_.-]{1,64}$"  # OpenAI's rule for function names


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments; None: no arguments
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call in an assistant message the client sends back (the conversation so far)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolFields(BaseModel):
    """The chat request's tool fields."""

    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_mode(self) -> str:
        """ "none", "auto", "required" or "named": how the output is read (module docstring)."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise SamplingParamsError("tool_choice", "tool_choice needs tools")
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def tool_constraint(self) -> StructuredOutputsParams | None:
        """The grammar that ``required`` or a named function puts on the output; None otherwise."""
        mode = self.tool_mode()
        if mode not in ("required", "named"):
            return None
        assert self.tools is not None
        if isinstance(self.tool_choice, NamedToolChoice):
            function = self.named_function()
            schema = function.parameters or {"type": "object", "properties": {}}
        else:
            schema = calls_schema(self.tools, self.parallel_tool_calls)
        try:
            # Compact JSON: the arguments are read by a program, and whitespace only costs tokens
            # (and, to a small model, is a loop it can fall into).
            return StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        except SamplingParamsError as err:
            message = f"tools: a function's parameters are no schema the grammar reads: {err}"
            raise SamplingParamsError("tools", message) from None

    def tool_call_output(self) -> ToolCallOutput | None:
        """What reads calls out of this request's output; None when nothing is read (no tools, or "none")."""
        mode = self.tool_mode()
        if mode == "none":
            return None
        return ToolCallOutput(mode, self.named_function().name if mode == "named" else None)

    def named_function(self) -> FunctionDefinition:
        assert isinstance(self.tool_choice, NamedToolChoice)
        name = self.tool_choice.function.name
        for tool in self.tools or []:
            if tool.function.name == name:
                return tool.function
        raise SamplingParamsError("tool_choice", f"tool_choice names {name!r}, which is not in tools")


def calls_schema(tools: list[ChatTool], parallel_tool_calls: bool | None) -> dict[str, Any]:
    """A JSON Schema of ``[{"name": <a tool>, "parameters": <its arguments>}, ...]``: at least one call."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool.function.name]},
                "parameters": tool.function.parameters or {"type": "object", "properties": {}},
            },
            "required": ["name", "parameters"],
        }
        for tool in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


# -- the prompt ------------------------------------------------------------------------


def encode_chat_with_tools(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[ChatTool] | None
) -> list[int]:
    """Token ids of the conversation, tools included, ready for the reply."""
    tool_dicts: list[Any] | None = [t.model_dump(exclude_none=True) for t in tools] if tools else None
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if "tools" not in template:  # the template cannot show tools or calls: write them as text
        messages, tool_dicts = render_tools(messages, tool_dicts), None
    text = tokenizer.apply_chat_template(messages, tools=tool_dicts, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Messages in plain roles and text, for a template that knows no tools: the tools described in
    the system message, calls as ``<tool_call>`` blocks, tool results as ``<tool_response>`` blocks
    in a user message (the layout of Qwen2.5's template)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content") or ""
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = [_call_text(call["function"]) for call in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join([content, *calls]).strip()})
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": message["role"], "content": content})
    if tools:
        listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        instructions = (
            "# Tools\n\nYou can call these functions to help answer. Their signatures, one per line, "
            f"between <tools> and </tools>:\n<tools>\n{listing}\n</tools>\n\nTo call one, write a JSON "
            'object with its name and arguments between <tool_call> and </tool_call>:\n<tool_call>\n{"name": '
            '<function name>, "arguments": <arguments as a JSON object>}\n</tool_call>'
        )
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{instructions}"}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def _call_text(function: dict[str, Any]) -> str:
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        arguments = _json_or_text(arguments)
    call = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_START}\n{call}\n{TOOL_CALL_END}"


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def template_message(
    role: str, content: str, tool_calls: list[ToolCall] | None, tool_call_id: str | None
) -> dict[str, Any]:
    """One message as chat templates read it: a call's arguments as a dict (Qwen2.5's template
    writes them with ``tojson``), a tool result with the id of its call."""
    message: dict[str, Any] = {"role": role, "content": content}
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": _json_or_text(call.function.arguments)},
            }
            for call in tool_calls
        ]
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
    return message


# -- the output ------------------------------------------------------------------------


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tool_call(index: int | None, name: str, arguments: str) -> dict[str, Any]:
    """A call as the API returns it; with ``index``, as a streamed delta carries it."""
    call: dict[str, Any] = {
        "id": new_tool_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    return call if index is None else {"index": index, **call}


class ToolCallOutput:
    """Turns one chat response's text into content and ``tool_calls``, whole or chunk by chunk (per choice)."""

    def __init__(self, mode: str, function_name: str | None = None) -> None:
        assert mode in ("auto", "required", "named") and (mode == "named") == (function_name is not None)
        self.mode, self.function_name = mode, function_name
        self.parsers: dict[int, HermesToolParser] = {}  # auto: per choice
        self.texts: dict[int, str] = {}  # required: per choice, the whole text until the end
        self.num_calls: dict[int, int] = {}  # per choice, calls streamed so far

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message and finish reason of a whole output."""
        if self.mode == "named":
            assert self.function_name is not None
            return _message("", [tool_call(None, self.function_name, text)]), finish_reason
        content, calls = parse_tool_calls(text) if self.mode == "auto" else _required_calls(text)
        made = [tool_call(None, c["name"], c["arguments"]) for c in calls]
        return _message(content, made), _finish_reason(finish_reason, bool(made))

    def delta(self, index: int, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A streamed chunk's delta and finish reason, from the choice's new text."""
        if self.mode == "named":
            assert self.function_name is not None
            if not text:
                return {}, finish_reason
            opening = index not in self.num_calls
            self.num_calls[index] = 1
            call = tool_call(0, self.function_name, text) if opening else {"index": 0, "function": {"arguments": text}}
            return {"tool_calls": [call]}, finish_reason
        if self.mode == "auto":
            parser = self.parsers.setdefault(index, HermesToolParser())
            content, calls = parser.feed(text)
            if finish_reason is not None:
                more_content, more_calls = parser.finish()
                content, calls = content + more_content, calls + more_calls
        else:  # required: the list parses only whole
            self.texts[index] = self.texts.get(index, "") + text
            content, calls = "", []
            if finish_reason is not None:
                parsed_content, calls = _required_calls(self.texts.pop(index))
                content = parsed_content or ""
        delta: dict[str, Any] = {"content": content} if content else {}
        if calls:
            first = self.num_calls.get(index, 0)
            delta["tool_calls"] = [tool_call(first + i, c["name"], c["arguments"]) for i, c in enumerate(calls)]
            self.num_calls[index] = first + len(calls)
        return delta, _finish_reason(finish_reason, self.num_calls.get(index, 0) > 0)


def _required_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The calls of a ``required`` output, a JSON list; the text as content if it does not parse (cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text or None, []
    calls = [parse_call(json.dumps(item)) for item in value] if isinstance(value, list) else []
    if not calls or any(c is None for c in calls):
        return text or None, []
    return None, [c for c in calls if c is not None]


def _message(content: str | None, calls: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


def _finish_reason(finish_reason: str | None, called: bool) -> str | None:
    """vLLM's rule: "tool_calls" when an auto or required output ended (not cut short) with calls."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason
