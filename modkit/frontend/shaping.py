"""The JSON bodies of the OpenAI API's responses, built from the engine's deltas.

``Shaper`` makes one response: the chunks of a stream (``chat.completion.chunk`` or
``text_completion``, with logprobs in OpenAI's chat or completions form), or the whole
body once every delta is in.
"""

from __future__ import annotations

import time
from typing import Any

from modkit.engine.output_processor import CompletionDelta
from modkit.frontend.interface import EngineClient
from modkit.frontend.tools import ToolCallOutput
from modkit.sampling_params import SamplingParams


class Shaper:
    """Builds the JSON bodies of one response, streamed or whole."""

    def __init__(
        self, engine: EngineClient, kind: str, request_id: str, model: str, prompt_len: int, params: SamplingParams
    ) -> None:
        self.engine, self.kind, self.id, self.model = engine, kind, request_id, model
        self.prompt_len, self.params, self.created = prompt_len, params, int(time.time())
        self.completion_tokens = 0
        self.tool_calls: ToolCallOutput | None = None  # chat with tools: reads calls out of the text

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_len,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_len + self.completion_tokens,
        }

    def opening_chunks(self) -> list[dict[str, Any]]:
        if self.kind != "chat":
            return []
        return [
            self._envelope(
                "chat.completion.chunk",
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(self.params.n)
                ],
            )
        ]

    def chunk(self, d: CompletionDelta) -> dict[str, Any]:
        self.completion_tokens += len(d.new_token_ids)
        choice: dict[str, Any] = {
            "index": d.index,
            "logprobs": self._logprobs(d.new_token_ids, d.new_logprobs),
            "finish_reason": d.finish_reason,
        }
        if self.kind == "chat":
            choice["delta"] = {"content": d.text} if d.text or d.finish_reason is None else {}
            if self.tool_calls is not None:
                choice["delta"], choice["finish_reason"] = self.tool_calls.delta(d.index, d.text, d.finish_reason)
            return self._envelope("chat.completion.chunk", [choice])
        choice["text"] = d.text
        return self._envelope("text_completion", [choice])

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, []), "usage": self.usage()}

    def full(self, deltas: list[CompletionDelta]) -> dict[str, Any]:
        choices = []
        for i in range(self.params.n):
            mine = [d for d in deltas if d.index == i]
            ids = [t for d in mine for t in d.new_token_ids]
            lps = [lp for d in mine for lp in (d.new_logprobs or [])] if self.params.logprobs is not None else None
            self.completion_tokens += len(ids)
            text, last = "".join(d.text for d in mine), mine[-1]
            choice: dict[str, Any] = {
                "index": i,
                "logprobs": self._logprobs(ids, lps),
                "finish_reason": last.finish_reason,
            }
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
                if self.tool_calls is not None:
                    choice["message"], choice["finish_reason"] = self.tool_calls.message(text, last.finish_reason)
            else:
                choice["text"] = text
            choices.append(choice)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, choices), "usage": self.usage()}

    def _logprobs(self, ids: list[int], lps: list[Any] | None) -> dict[str, Any] | None:
        if self.params.logprobs is None or lps is None:
            return None
        tok = self.engine.tokenizer

        def piece(t: int) -> str:
            return str(tok.decode([t]))

        if self.kind == "chat":
            content = []
            for token, entry in zip(ids, lps, strict=True):
                top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[: self.params.logprobs]
                content.append(
                    {
                        "token": piece(token),
                        "logprob": entry[token].logprob,
                        "bytes": list(piece(token).encode()),
                        "top_logprobs": [
                            {"token": piece(t), "logprob": lp.logprob, "bytes": list(piece(t).encode())}
                            for t, lp in top
                        ],
                    }
                )
            return {"content": content}
        return {
            "tokens": [piece(t) for t in ids],
            "token_logprobs": [e[t].logprob for t, e in zip(ids, lps, strict=True)],
            "top_logprobs": [
                {
                    piece(t): lp.logprob
                    for t, lp in sorted(e.items(), key=lambda kv: -kv[1].logprob)[: self.params.logprobs]
                }
                for e in lps
            ],
        }
