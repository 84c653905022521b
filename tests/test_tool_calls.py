"""Tool calls: the Hermes ``<tool_call>`` parser on hand-written text (whole and streamed at
every boundary), the prompt with tools, and ``tool_choice`` through the pipeline's API, where
``required`` and a named function make even the tiny model call with schema-valid arguments."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from modkit import Pipeline
from modkit.frontend.hermes import HermesToolParser, parse_tool_calls
from modkit.frontend.protocol import ChatCompletionRequest
from modkit.frontend.tools import ToolCallOutput, encode_chat_with_tools
from modkit.model import load_tokenizer
from modkit.sampling_params import SamplingParamsError

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999},
        "b": {"type": "integer", "minimum": -999, "maximum": 999},
    },
    "required": ["a", "b"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Adds two numbers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}

HERMES = (
    "Let me check both.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 40}}\n</tool_call>'
)


def test_hermes_calls_are_cut_out_of_the_text() -> None:
    content, calls = parse_tool_calls(HERMES)
    assert content == "Let me check both.\n"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("add", {"a": 2, "b": 40}),
    ]
    assert parse_tool_calls("No tools today, <tool maybe.") == ("No tools today, <tool maybe.", [])
    broken = "Here: <tool_call>{not json}</tool_call>"
    assert parse_tool_calls(broken) == (broken, []), "a block that is no call stays text"
    unclosed = 'ok <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}'
    assert parse_tool_calls(unclosed)[1] == [{"name": "add", "arguments": '{"a": 1, "b": 2}'}]


def streamed(pieces: list[str]) -> tuple[str, list[dict[str, Any]]]:
    parser = HermesToolParser()
    content, calls = "", []
    for piece in pieces:
        more_content, more_calls = parser.feed(piece)
        content, calls = content + more_content, calls + more_calls
    more_content, more_calls = parser.finish()
    return content + more_content, calls + more_calls


@pytest.mark.parametrize("text", [HERMES, "plain text < with <tool_ a near-tag", "<tool_call>{bad}</tool_call> x"])
def test_streamed_text_parses_as_the_whole_at_every_chunk_boundary(text: str) -> None:
    whole_content, whole_calls = parse_tool_calls(text)
    assert streamed(list(text)) == (whole_content or "", whole_calls), "one character at a time"
    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]]) == (whole_content or "", whole_calls), cut
    for a in range(0, len(text), 7):
        for b in range(a, len(text), 11):
            assert streamed([text[:a], text[a:b], text[b:]]) == (whole_content or "", whole_calls), (a, b)


def test_streamed_deltas_take_vllms_shape() -> None:
    output = ToolCallOutput("auto")
    deltas = []
    for i in range(0, len(HERMES), 5):
        last = i + 5 >= len(HERMES)
        deltas.append(output.delta(0, HERMES[i : i + 5], "stop" if last else None))
    content = "".join(d.get("content", "") for d, _ in deltas)
    calls = [c for d, _ in deltas for c in d.get("tool_calls", [])]
    assert content == "Let me check both.\n"
    assert [c["index"] for c in calls] == [0, 1] and all(c["id"].startswith("chatcmpl-tool-") for c in calls)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"] and all(
        c["type"] == "function" for c in calls
    )
    assert [reason for _, reason in deltas][-1] == "tool_calls" and {r for _, r in deltas[:-1]} == {None}
    message, reason = ToolCallOutput("auto").message(HERMES, "stop")
    assert reason == "tool_calls" and [c["function"]["arguments"] for c in message["tool_calls"]] == [
        c["function"]["arguments"] for c in calls
    ]
    assert ToolCallOutput("auto").message("just text", "stop") == (
        {"role": "assistant", "content": "just text"},
        "stop",
    )


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_tool_choice_is_checked_and_names_the_field() -> None:
    named = {"type": "function", "function": {"name": "add"}}
    assert request(tools=TOOLS, tool_choice=named).to_sampling_params(10).structured_outputs is not None
    assert request(tools=TOOLS).to_sampling_params(10).structured_outputs is None, "auto: nothing forced"
    cases = {
        "tool_choice": [
            {"tool_choice": "required"},
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        ],
        "tools": [
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
                "tool_choice": "required",
            }
        ],
    }
    for field, bodies in cases.items():
        for body in bodies:
            with pytest.raises(SamplingParamsError) as err:
                request(**body).to_sampling_params(10)
            assert err.value.field == field, body


def test_the_prompt_shows_the_tools_and_the_calls_so_far() -> None:
    tokenizer = load_tokenizer(None)
    assert "tools" not in tokenizer.chat_template, "the embedded template knows no tools: they are written as text"
    conversation = [
        {"role": "user", "content": "Add 2 and 40"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 40}}}
            ],
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    text = tokenizer.decode(encode_chat_with_tools(tokenizer, conversation, request(tools=TOOLS).tools))
    assert text.startswith("<|im_start|>system\n") and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 40}}\n</tool_call>' in text
    assert "<tool_response>\n42\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")

    # A template that takes tools (as Qwen2.5's does) gets them as they are.
    tokenizer.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    text = tokenizer.decode(
        encode_chat_with_tools(tokenizer, [{"role": "user", "content": "hi"}], request(tools=TOOLS).tools)
    )
    assert text == "TOOLS:get_weather;add;user: hi\n"  # templates drop the newline after a block tag


# -- through the pipeline's OpenAI API ------------------------------------------------


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    with Pipeline.launch(num_kv_blocks=256, ports="auto", progress=False) as p:
        yield p


PROMPTS = ["What is the weather in Paris?", "Add 2 and 40.", "Hello!"]


def chat(pipeline: Pipeline, prompt: str, **fields: Any) -> dict[str, Any]:
    body = {"model": pipeline.client().models.list().data[0].id, "messages": [{"role": "user", "content": prompt}]}
    response = httpx.post(f"{pipeline.url}/v1/chat/completions", json={**body, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def streamed_calls(pipeline: Pipeline, prompt: str, **fields: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The calls a stream delivers, put together from their deltas as a client does; and the finish reason."""
    client = pipeline.client()
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": prompt}], stream=True, **fields
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.slow
def test_required_and_named_calls_parse_against_the_schema(pipeline: Pipeline) -> None:
    for prompt in PROMPTS:
        for choice, reason in (("required", "tool_calls"), ({"type": "function", "function": {"name": "add"}}, "stop")):
            fields = {
                "tools": TOOLS,
                "tool_choice": choice,
                "parallel_tool_calls": False,
                "max_tokens": 120,
                "temperature": 0,
            }
            done = chat(pipeline, prompt, **fields)["choices"][0]
            assert done["finish_reason"] == reason, done
            calls = done["message"]["tool_calls"]
            assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("chatcmpl-tool-")
            name = calls[0]["function"]["name"]
            assert name in SCHEMAS and (choice == "required" or name == "add")
            jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), SCHEMAS[name])
            stream, stream_reason = streamed_calls(pipeline, prompt, **fields)
            assert stream_reason == reason
            assert [(c["name"], c["arguments"]) for c in stream] == [(name, calls[0]["function"]["arguments"])]


@pytest.mark.slow
def test_auto_and_none_read_the_models_own_text(pipeline: Pipeline) -> None:
    for prompt in PROMPTS:
        fields = {"tools": TOOLS, "max_tokens": 60, "temperature": 0}
        none = chat(pipeline, prompt, tool_choice="none", **fields)["choices"][0]
        auto = chat(pipeline, prompt, tool_choice="auto", **fields)["choices"][0]
        content, calls = parse_tool_calls(none["message"]["content"])
        assert "tool_calls" not in none["message"] and none["finish_reason"] in ("stop", "length")
        assert auto["message"]["content"] == content and len(auto["message"].get("tool_calls", [])) == len(calls)
    conversation = [
        {"role": "user", "content": "Add 2 and 40"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 40}'}}
            ],
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    body = {
        "model": pipeline.client().models.list().data[0].id,
        "messages": conversation,
        "tools": TOOLS,
        "max_tokens": 5,
    }
    done = httpx.post(f"{pipeline.url}/v1/chat/completions", json=body, timeout=60)
    assert done.status_code == 200, done.text
    tokenizer = load_tokenizer(None)
    as_template = [dict(m) for m in conversation]
    as_template[1]["content"] = ""
    expected = encode_chat_with_tools(tokenizer, as_template, request(tools=TOOLS).tools)
    assert done.json()["usage"]["prompt_tokens"] == len(expected)


@pytest.mark.slow
def test_bad_tool_fields_are_a_400_naming_the_field(pipeline: Pipeline) -> None:
    body = {"model": pipeline.client().models.list().data[0].id, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("tool_choice", {"tool_choice": "required"}),
        ("tool_choice", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        ("tools", {"tools": [{"type": "custom", "custom": {"name": "x"}}]}),
        (
            "tools",
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
                "tool_choice": "required",
            },
        ),
    ]
    for param, extra in cases:
        response = httpx.post(f"{pipeline.url}/v1/chat/completions", json={**body, **extra}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (extra, response.text)
