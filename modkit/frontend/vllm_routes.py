"""Routes vLLM's OpenAI server has beside the OpenAI API: ``/tokenize``, ``/detokenize``,
``/version`` and ``/metrics``.

- ``POST /tokenize``: a ``prompt`` (tokenized as ``/v1/completions`` does) or chat
  ``messages`` (in the chat template, as ``/v1/chat/completions`` does); answers
  ``tokens``, ``count``, ``max_model_len`` and, with ``return_token_strs``, ``token_strs``.
- ``POST /detokenize``: ``tokens`` -> ``prompt``.
- ``GET /tokenizer_info``: the tokenizer's settings (its class, special tokens, chat
  template), as vLLM's ``--enable-tokenizer-info-endpoint`` answers them; lm-eval's API
  models tokenize through these three routes when a server has them, with no tokenizer of
  their own.
- ``GET /version``: modkit's version.
- ``GET /metrics``: Prometheus text (``metrics.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

import modkit
from modkit.frontend.guards import APIError
from modkit.frontend.interface import EngineClient
from modkit.frontend.metrics import ServingMetrics
from modkit.frontend.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    chat_messages,
)
from modkit.transport.prometheus import CONTENT_TYPE


def vllm_routes(
    engine: EngineClient,
    metrics: ServingMetrics,
    check_model: Callable[[str | None], None],
    error_responses: dict[int | str, dict[str, Any]],
) -> APIRouter:
    """The routes, over ``engine``'s tokenizer and ``metrics``; ``check_model`` answers 404 for
    another model's name."""
    router = APIRouter()
    tokenizer = engine.tokenizer

    @router.post("/tokenize", responses=error_responses)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        check_model(req.model)
        if req.messages is not None:
            try:
                messages = chat_messages(req.messages)
            except ValueError as err:
                raise APIError(400, str(err), param="messages") from err
            chat = tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, tokenize=False
            )
            text, special = str(chat), bool(req.add_special_tokens)  # vLLM's default for messages: false
        else:
            text, special = str(req.prompt), req.add_special_tokens is not False  # for a prompt: true
        ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=special)
        strs = list(tokenizer.convert_ids_to_tokens(ids)) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)

    @router.post("/detokenize", responses=error_responses)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        check_model(req.model)
        vocab_size = len(tokenizer)
        if any(t >= vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be below the vocabulary's size, {vocab_size}", param="tokens")
        return DetokenizeResponse(prompt=str(await asyncio.to_thread(tokenizer.decode, req.tokens)))

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return describe_tokenizer(tokenizer)

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": modkit.__version__}

    @router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def prometheus() -> Response:
        # On a thread: the pipeline's engine states are calls to other processes.
        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE)

    return router


def describe_tokenizer(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's settings as plain JSON: what it was made with, its class, its special tokens
    as text, and its chat template. Not where it was loaded from: no path of the server's disk
    (vLLM's has ``name_or_path`` too)."""
    settings = {
        k: v
        for k, v in dict(getattr(tokenizer, "init_kwargs", {}) or {}).items()
        if not k.endswith("_file") and k != "name_or_path"
    }
    info = {k: _plain(v) for k, v in settings.items()}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        info[name] = getattr(tokenizer, name, None)
    info["tokenizer_class"] = type(tokenizer).__name__
    if getattr(tokenizer, "chat_template", None):
        info["chat_template"] = tokenizer.chat_template
    return info


def _plain(value: Any) -> Any:
    """A setting as JSON: a special token object becomes its text; what JSON cannot hold, its repr."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)
