"""The OpenAI API's request and response bodies, and their mapping to ``SamplingParams``.

Request models accept the OpenAI fields modkit implements plus vLLM's extra sampling
fields (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``). Any other field is a 400 that names it: vLLM ignores fields it does
not know (it logs them), but a client that sends ``suffix`` or ``use_beam_search`` and gets
plain text back has no way to tell. ``model`` may be left out: the served model answers, as
in vLLM. Types are strict, as JSON Schema's are: ``true`` is no integer and ``"1"`` no
number (``3.0`` is an integer).

Every field states its bounds here, so that a bad value is a 400 before any work is done
and ``/openapi.json`` documents the limits (a schema-driven fuzzer reads them). The
bounds are OpenAI's where it has them (``n`` <= 128, ``logprobs`` <= 20, ``logit_bias``
in [-100, 100], at most 4 stop strings, which is also vLLM's ``VLLM_MAX_STOP_STRINGS``),
vLLM's otherwise.
``SamplingParams`` checks the values again (it is also built without the API) and the
engine checks what only it knows: token ids against the vocabulary, the prompt against
the context length.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from modkit.frontend.structured import StructuredOutputFields
from modkit.frontend.tools import ToolCall, ToolFields
from modkit.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingParamsError, StructuredOutputsParams

MAX_N = 128  # OpenAI's limit on completions per request; each is a request of its own in the engine
# Prompts in one /v1/completions batch: vLLM's VLLM_MAX_COMPLETION_PROMPTS. Each has n completions.
MAX_PROMPTS = 1024
MAX_STOP_STRINGS = 4  # OpenAI's "up to 4 sequences"
# Stop strings are matched against the tail of the output text after every token: a
# bound keeps that cheap. Real ones are a few characters ("\n\nUser:").
MAX_STOP_STRING_CHARS = 256
# seed: an integer every JSON client writes exactly, |seed| <= 2**53 - 1 (JavaScript's
# MAX_SAFE_INTEGER), inside vLLM's int64. JSON Schema's numbers are floats: a bound near
# 2**63 (vLLM's) is blurred by 1,024 either way, and a schema-driven client would then
# disagree with this API about seeds near it.
MAX_SAFE_INTEGER = 2**53 - 1


def _no_lone_surrogates(text: str) -> str:
    """JSON may escape half a UTF-16 pair ("\\ud800"); such a string has no UTF-8 form, so the
    tokenizer (and any response that echoes it) could not encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "the string holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode"
        ) from None
    return text


def _integral(value: object) -> object:
    """JSON Schema counts 3.0 as an integer, so this API does too; true is still not one."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _no_suffix(suffix: str | None) -> None:
    if suffix is not None:  # vLLM: the same 400 for a model without fill-in-the-middle
        raise ValueError("suffix is only supported for models with fill-in-the-middle completion; this one has none")


INTEGRAL = BeforeValidator(_integral)  # after a field's bounds, so that the schema keeps them
Suffix = Annotated[str | None, AfterValidator(_no_suffix), WithJsonSchema({"type": "null"})]
Text = Annotated[str, AfterValidator(_no_lone_surrogates)]
StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
TokenId = Annotated[int, Field(ge=0), INTEGRAL]
# logit_bias's JSON keys are token ids written as strings ({"50256": -100}).
TOKEN_ID_KEY = r"^[0-9]{1,10}$"


def _check_logit_bias(bias: dict[str, Any]) -> dict[str, Any]:
    """One error for the whole mapping: a body of 300,000 bad keys would otherwise cost the
    event loop seconds to list them all (as ``fail_fast`` saves for the lists)."""
    for key, value in bias.items():
        if not re.fullmatch(TOKEN_ID_KEY, key):
            raise ValueError(f"keys must be token ids (digits), got {key[:20]!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise ValueError(f"values must be numbers in [-100, 100], got {value!r} for token {key}")
    return bias


LogitBias = Annotated[
    dict[str, Any],
    AfterValidator(_check_logit_bias),
    WithJsonSchema(
        {
            "type": "object",
            "patternProperties": {TOKEN_ID_KEY: {"type": "number", "minimum": -100, "maximum": 100}},
            "additionalProperties": False,
        }
    ),
]
# Lists a client may make long stop at their first bad item (one error, not a million).
TokenIds = Annotated[list[TokenId], Field(fail_fast=True)]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _SamplingFields(StructuredOutputFields):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = None  # None: the served model
    n: Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL] = 1
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, Field(ge=-MAX_SAFE_INTEGER, le=MAX_SAFE_INTEGER), INTEGRAL] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # vLLM's extras
    top_k: Annotated[int, Field(ge=-1), INTEGRAL] | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: Annotated[int, Field(ge=0), INTEGRAL] = 0
    ignore_eos: bool = False
    stop_token_ids: TokenIds | None = None

    def _params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        optional: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "stop_token_ids": self.stop_token_ids,
        }
        bias = None if self.logit_bias is None else {int(k): v for k, v in self.logit_bias.items()}
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else (self.stop or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=bias,
            structured_outputs=self.constraint(),
            **{k: v for k, v in optional.items() if v is not None},
        )


class ContentPart(BaseModel):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is served."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[ContentPart], Field(fail_fast=True)] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back with the conversation
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.type != "text" for part in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(part.text or "" for part in self.content)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the chat template takes them; ValueError for content parts other than text."""
    return [{"role": m.role, "content": m.text()} for m in messages]


class ChatCompletionRequest(_SamplingFields, ToolFields):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = (
        None  # the newer name; wins when both are given
    )
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:  # vLLM lets top_logprobs=0 through alone
            raise SamplingParamsError("top_logprobs", "top_logprobs needs logprobs=true")
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def constraint(self) -> StructuredOutputsParams | None:
        """``response_format`` or ``structured_outputs``, or the grammar of ``tool_choice`` (not both)."""
        tools = self.tool_constraint()
        if tools is None:
            return super().constraint()
        if self.structured_outputs is not None or (self.response_format and self.response_format.type != "text"):
            raise SamplingParamsError(
                "tool_choice",
                f"tool_choice={self.tool_mode()} does not combine with response_format or structured_outputs",
            )
        return tools


Prompt = Annotated[Text, Field(min_length=1)]
PromptIds = Annotated[TokenIds, Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    """``prompt`` as clients send it: a text, token ids, or a list of either (a batch). Each
    prompt of a batch gets ``n`` choices, indexed prompt by prompt: prompt ``p``'s completion
    ``i`` is choice ``p * n + i``, as in OpenAI's API and vLLM."""

    prompt: (
        Prompt
        | PromptIds
        | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)]
        | Annotated[list[PromptIds], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)]
    )
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL] | None = None
    echo: bool = False  # the prompt before each choice: its text, and with logprobs its tokens' logprobs
    suffix: Suffix = None

    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt a text or its token ids."""
        if isinstance(self.prompt, str) or not isinstance(self.prompt[0], str | list):
            return [self.prompt]
        return list(self.prompt)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.best_of is not None and self.best_of != self.n:
            raise SamplingParamsError(
                "best_of", f"best_of must equal n ({self.n}) if given: best_of > n is not supported, got {self.best_of}"
            )
        # With echo, the prompt's tokens are shown with logprobs too (as vLLM does).
        prompt_logprobs = self.logprobs if self.echo else None
        return self._params(self.max_tokens or default_max_tokens, self.logprobs, prompt_logprobs)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def now() -> int:
    return int(time.time())


# -- vLLM's /tokenize and /detokenize ---------------------------------------------------------


class TokenizeRequest(BaseModel):
    """vLLM's two ``/tokenize`` bodies in one: a ``prompt`` to tokenize as ``/v1/completions``
    would, or ``messages`` in the chat template, as ``/v1/chat/completions`` would."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, fail_fast=True)] | None = None
    add_generation_prompt: bool = True  # messages only
    add_special_tokens: bool | None = (
        None  # vLLM's defaults: true for a prompt, false for messages (the template has them)
    )
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str
