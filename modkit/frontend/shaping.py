"""The JSON bodies of the OpenAI API's responses, built from the engine's deltas.

``Shaper`` shapes the choices of one prompt: the chunks of a stream
(``chat.completion.chunk`` or ``text_completion``, with logprobs in OpenAI's chat or
completions form), or the whole body once every delta is in. A batch of completion prompts
has a ``Shaper`` each, whose choices start at ``first_index`` (prompt ``p``'s at ``p * n``);
``merge_full`` and ``usage_chunk`` put their parts in one response.

Completions logprobs carry ``text_offset``: where each token's text starts, counted from
the start of the choice's text (the prompt's, with ``echo``), as vLLM counts it.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from modkit.engine.output_processor import CompletionDelta
from modkit.frontend.interface import EngineClient
from modkit.frontend.tools import ToolCallOutput
from modkit.sampling_params import SamplingParams


class Shaper:
    """Builds the JSON bodies of one response, streamed or whole."""

    def __init__(
        self,
        engine: EngineClient,
        kind: str,
        request_id: str,
        model: str,
        prompt_len: int,
        params: SamplingParams,
        *,
        first_index: int = 0,
        echo: str | None = None,
        echo_ids: list[int] | None = None,
    ) -> None:
        self.engine, self.kind, self.id, self.model = engine, kind, request_id, model
        self.prompt_len, self.params, self.created = prompt_len, params, int(time.time())
        self.first_index = first_index  # of this prompt's first choice in the response
        self.echo = echo  # the prompt's text, put before each choice's (completions' echo)
        self.echo_ids = echo_ids or []  # and its tokens, before each choice's in logprobs
        self.completion_tokens = 0
        self._echoed: set[int] = set()  # choices whose stream has had the prompt
        self._offsets: dict[int, int] = {}  # choice -> text_offset of its next token, in a stream
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
        offset = self._offsets.get(d.index, 0)
        echoing = self.echo is not None and d.index not in self._echoed
        ids, lps = self._with_prompt(d.new_token_ids, d.new_logprobs, d.prompt_logprobs if echoing else None)
        logprobs = self._logprobs(ids, lps, offset)
        if logprobs is not None and logprobs.get("tokens"):
            self._offsets[d.index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        choice: dict[str, Any] = {
            "index": self.first_index + d.index,
            "logprobs": logprobs,
            "finish_reason": d.finish_reason,
        }
        if self.kind == "chat":
            choice["delta"] = {"content": d.text} if d.text or d.finish_reason is None else {}
            if self.tool_calls is not None:
                choice["delta"], choice["finish_reason"] = self.tool_calls.delta(d.index, d.text, d.finish_reason)
            return self._envelope("chat.completion.chunk", [choice])
        choice["text"] = d.text
        if echoing:
            self._echoed.add(d.index)
            choice["text"] = f"{self.echo}{d.text}"
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
            ids, lps = self._with_prompt(ids, lps, mine[0].prompt_logprobs)
            choice: dict[str, Any] = {
                "index": self.first_index + i,
                "logprobs": self._logprobs(ids, lps),
                "finish_reason": last.finish_reason,
            }
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
                if self.tool_calls is not None:
                    choice["message"], choice["finish_reason"] = self.tool_calls.message(text, last.finish_reason)
            else:
                choice["text"] = (self.echo or "") + text
            choices.append(choice)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, choices), "usage": self.usage()}

    def _with_prompt(
        self, ids: list[int], lps: list[Any] | None, prompt_lps: list[Any] | None
    ) -> tuple[list[int], list[Any] | None]:
        """With ``echo`` and logprobs, a choice's first tokens are its prompt's, with their logprobs
        (``prompt_lps``, the first None) before the generated ones."""
        if self.echo is None or lps is None or prompt_lps is None:
            return ids, lps
        return self.echo_ids + ids, prompt_lps + lps

    def _logprobs(self, ids: list[int], lps: list[Any] | None, offset: int = 0) -> dict[str, Any] | None:
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
        tokens = [piece(t) for t in ids]
        starts = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset)) if tokens else []
        return {  # an entry of None: the prompt's first token, which nothing scores
            "text_offset": starts,
            "tokens": tokens,
            "token_logprobs": [None if e is None else e[t].logprob for t, e in zip(ids, lps, strict=True)],
            "top_logprobs": [
                None
                if e is None
                else {
                    piece(t): lp.logprob
                    for t, lp in sorted(e.items(), key=lambda kv: -kv[1].logprob)[: self.params.logprobs]
                }
                for e in lps
            ],
        }


def merge_full(shapers: list[Shaper], deltas: list[list[CompletionDelta]]) -> dict[str, Any]:
    """One response from each prompt's whole body: their choices in turn, their usage summed."""
    bodies = [shaper.full(d) for shaper, d in zip(shapers, deltas, strict=True)]
    merged = bodies[0]
    merged["choices"] = [choice for body in bodies for choice in body["choices"]]
    merged["usage"] = _summed_usage(shapers)
    return merged


def usage_chunk(shapers: list[Shaper]) -> dict[str, Any]:
    """A stream's last chunk: no choices, the usage of every prompt."""
    return {**shapers[0].usage_chunk(), "usage": _summed_usage(shapers)}


def _summed_usage(shapers: list[Shaper]) -> dict[str, int]:
    usages = [shaper.usage() for shaper in shapers]
    return {key: sum(u[key] for u in usages) for key in usages[0]}
