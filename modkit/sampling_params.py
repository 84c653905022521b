"""``SamplingParams``: how one request wants its tokens chosen, with vLLM's names and defaults.

A request carries one ``SamplingParams`` from the API to the sampler. It is validated once,
here, and never changes afterwards (the dataclass is frozen): every component may read it,
none may edit it. Fields fall into three groups:

- what the **sampler** reads each step: ``temperature``, ``top_p``, ``top_k``, ``min_p``,
  ``seed``, the three penalties, ``logit_bias``, ``min_tokens`` (with ``stop_token_ids``
  and the model's eos ids), ``logprobs``, ``structured_outputs`` (a grammar the output must
  follow, ``StructuredOutputsParams``);
- what the **engine** reads to decide when a request is finished: ``max_tokens``,
  ``stop_token_ids``, ``ignore_eos``, ``stop`` (strings, checked on the detokenized text);
- what the **detokenizer / API layer** reads: ``n``, ``stop``, ``include_stop_str_in_output``,
  ``skip_special_tokens``, ``detokenize``, ``prompt_logprobs``.

A bad value raises ``SamplingParamsError`` (a ``ValueError``) whose ``field`` names the
parameter and whose message says the value and the allowed range, so an API layer can turn
it into an OpenAI-style 400 with ``param`` filled in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

# A temperature below this is greedy sampling (vLLM's _SAMPLING_EPS): dividing logits by it
# would overflow, and the distribution is a point mass on the argmax anyway.
_SAMPLING_EPS = 1e-5

# OpenAI's API allows at most 20 top_logprobs; vLLM's default max_logprobs is also 20.
MAX_LOGPROBS = 20

# The range torch.Generator.manual_seed accepts.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


class SamplingType(IntEnum):
    """How the sampler picks a request's next token (vLLM's ``SamplingType``)."""

    GREEDY = 0  # argmax of the processed logits; temperature < 1e-5
    RANDOM = 1  # a draw from the processed distribution, noise from the sampler's own generator
    RANDOM_SEED = 2  # a draw whose noise comes from the request's own generator, seeded by ``seed``


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range. ``field`` names it (OpenAI's error ``param``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """One grammar the output must follow (vLLM's ``StructuredOutputsParams``): exactly one field set.

    The sampler compiles it once per request (xgrammar, ``modkit.sampler.grammar``) and
    masks, at every step, each token the grammar does not allow next; once the grammar is
    complete only an end-of-sequence token is allowed, so the request finishes with
    ``finish_reason="stop"``. The grammar is checked here, so a bad one is a
    ``SamplingParamsError`` (a 400) before any work is done.
    """

    json: str | dict[str, Any] | None = None
    """A JSON schema (as a dict or its JSON text): the output is one JSON value valid against it."""
    regex: str | None = None
    """A regular expression the whole output matches."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF grammar (GBNF style, with a ``root`` rule) the output is a sentence of."""
    json_object: bool | None = None
    """True: the output is any JSON object (OpenAI's ``response_format={"type": "json_object"}``)."""
    disable_any_whitespace: bool = False
    """JSON without free whitespace: ``{"a":1,"b":2}``. Default False: any whitespace between JSON
    tokens, as vLLM allows, but at most 16 characters in a row (``grammar.MAX_JSON_WHITESPACE``, modkit's
    bound: a small model may otherwise emit newlines until ``max_tokens``)."""

    def __post_init__(self) -> None:
        kinds = [k for k in CONSTRAINT_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise SamplingParamsError(
                "structured_outputs",
                f"structured_outputs takes exactly one of {', '.join(CONSTRAINT_KINDS)}; got {kinds or 'none'}",
            )
        kind = kinds[0]
        value = getattr(self, kind)
        if kind == "json" and not isinstance(value, str | dict):
            raise SamplingParamsError(
                "structured_outputs.json", f"json must be a JSON schema (object or text), got {value!r}"
            )
        if kind in ("regex", "grammar") and not (isinstance(value, str) and value):
            raise SamplingParamsError(f"structured_outputs.{kind}", f"{kind} must be a non-empty string, got {value!r}")
        if kind == "choice" and not (
            isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)
        ):
            raise SamplingParamsError(
                "structured_outputs.choice", f"choice must be a list of non-empty strings, got {value!r}"
            )
        if kind == "json_object" and value is not True:
            raise SamplingParamsError(
                "structured_outputs.json_object", f"json_object must be true if given, got {value!r}"
            )
        if not isinstance(self.disable_any_whitespace, bool):
            raise SamplingParamsError(
                "structured_outputs.disable_any_whitespace", "disable_any_whitespace must be True or False"
            )
        if (error := _grammar_error(kind, self.source)) is not None:
            raise SamplingParamsError(f"structured_outputs.{kind}", f"invalid {kind}: {error}")

    @property
    def kind(self) -> str:
        """Which constraint this is: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(k for k in CONSTRAINT_KINDS if getattr(self, k) is not None)

    @property
    def source(self) -> str:
        """The constraint as one string (a schema as JSON text, choices as a JSON list); keys keep
        their order, which is the order a schema's properties are generated in."""
        value = getattr(self, self.kind)
        if isinstance(value, str):
            return value
        return json.dumps(value)


# The fields of StructuredOutputsParams that are constraints, in the order vLLM lists them.
CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@functools.lru_cache(maxsize=256)
def _grammar_error(kind: str, source: str) -> str | None:
    """Why xgrammar cannot read this constraint, or None if it can. Needs no tokenizer, so the API
    checks it before a request is queued. Cached: ``child_params`` and every decode of the
    request on the wire check it again."""
    import xgrammar as xgr  # imported only where grammars are used

    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(source)
        elif kind == "regex":
            xgr.Grammar.from_regex(source)
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(source)
    except (RuntimeError, ValueError) as err:  # xgrammar's parse errors: the first line says what and where
        first = (str(err).strip().splitlines() or ["unreadable"])[0]
        return re.sub(r"^(\[[^\]]*\]\s*)?\S+\.cc:\d+:\s*", "", first)  # less "[time] file.cc:line: "
    return None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling parameters of one request. Validated at construction; immutable afterwards."""

    n: int = 1
    """Number of completions for the prompt. Default 1. The engine fans a request out into ``n``
    requests of ``n=1`` (see ``child_params``); the sampler only ever sees ``n=1``. Greedy
    sampling with ``n > 1`` is rejected, as in vLLM: the completions would all be identical."""

    temperature: float = 1.0
    """Divides the logits before sampling: < 1 sharpens the distribution, > 1 flattens it.
    Default 1.0. Below 1e-5 (vLLM's ``_SAMPLING_EPS``, so 0 included) the sampler is greedy and
    ignores ``top_p``, ``top_k``, ``min_p`` and ``seed``."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probabilities add up to
    at least ``top_p``. In (0, 1]; default 1.0 keeps everything."""

    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens (every token tied with the k-th is kept too).
    Default 0 = off; -1 (vLLM's older spelling of off) is accepted and stored as 0."""

    min_p: float = 0.0
    """Drop tokens whose probability is below ``min_p`` times the most likely token's. In [0, 1];
    default 0.0 = off. Applied after temperature, before top_k and top_p (vLLM's order)."""

    seed: int | None = None
    """Seeds this request's own random generator, so its tokens are reproducible whatever else is
    in the batch. Default None: noise comes from the sampler's shared generator."""

    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token that already appears in the *output*
    (not the prompt). In [-2, 2]; default 0.0. Positive values push toward new tokens."""

    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it appears in the *output*. In [-2, 2];
    default 0.0. Positive values discourage verbatim repetition."""

    repetition_penalty: float = 1.0
    """For every token seen in the prompt *or* the output: positive logits are divided by it,
    negative ones multiplied (the CTRL paper's rule, as vLLM and transformers apply it). > 0;
    default 1.0 = off; > 1 discourages repetition, < 1 encourages it."""

    stop: list[str] = field(default_factory=list)
    """Strings that end generation when they appear in the detokenized output. Default: none.
    Typed as the list every reader sees; like vLLM's, the constructor also takes a single str or
    None and normalises it. Checked by the engine on text, never by the sampler; the stop string
    is cut from the output unless ``include_stop_str_in_output``."""

    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation when sampled (the token is kept in the output). Default:
    none. Duplicates are dropped. While ``min_tokens`` is not reached the sampler masks them."""

    ignore_eos: bool = False
    """Keep generating after an eos token (for benchmarks with a fixed output length). Default
    False. It does not change sampling: eos can still be drawn, the engine just does not finish
    on it. ``max_tokens`` and ``stop_token_ids`` still apply."""

    max_tokens: int | None = 16
    """Most tokens to generate. Default 16 (vLLM's default; OpenAI's is unbounded). None means up
    to the model's length limit, which only the engine knows."""

    min_tokens: int = 0
    """Fewest tokens to generate before eos or a ``stop_token_ids`` token may be sampled: the
    sampler masks those ids until the output is this long. Default 0. At most ``max_tokens``.
    Stop *strings* are not masked (vLLM's behaviour): the engine must not stop on them earlier."""

    logprobs: int | None = None
    """Return the log probability of each sampled token, its rank, and the ``logprobs`` most
    likely alternatives. Default None = no logprobs; 0 = only the sampled token's. At most 20
    (OpenAI's limit and vLLM's default ``max_logprobs``). Logprobs are those of the raw model
    output, before temperature, penalties or masks (vLLM's default ``raw_logprobs`` mode)."""

    prompt_logprobs: int | None = None
    """Like ``logprobs``, for every prompt token. Default None. At most 20. Needs logits for
    every prompt position, which is the model runner's job, not the sampler's."""

    logit_bias: dict[int, float] | None = None
    """Added to the logits of the given token ids before anything else (OpenAI's ``logit_bias``).
    Values in [-100, 100]: -100 effectively bans a token, +100 all but forces it. Default None.
    Keys are ints; an API layer receiving JSON converts its string keys first."""

    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text. Default True. Detokenizer only."""

    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text. Default False."""

    detokenize: bool = True
    """Produce output text, not only token ids. Default True. Stop strings need it."""

    structured_outputs: StructuredOutputsParams | None = None
    """A grammar the output must follow (a JSON schema, any JSON, a regex, one of some strings,
    an EBNF grammar): the sampler masks every token the grammar does not allow next. Default
    None = free text. See ``StructuredOutputsParams``."""

    def __post_init__(self) -> None:
        # The dataclass is frozen: normalised values are written with object.__setattr__.
        set_ = object.__setattr__
        set_(self, "n", _integer("n", self.n))
        if self.n < 1:
            raise SamplingParamsError("n", f"n must be >= 1, got {self.n}")
        set_(self, "temperature", _number("temperature", self.temperature))
        if self.temperature < 0:
            raise SamplingParamsError("temperature", f"temperature must be >= 0, got {self.temperature}")
        if self.n > 1 and self.temperature < _SAMPLING_EPS:
            raise SamplingParamsError("n", f"n must be 1 when sampling is greedy (temperature 0), got {self.n}")
        set_(self, "top_p", _number("top_p", self.top_p))
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _integer("top_k", self.top_k)
        if self.top_k < -1:
            raise SamplingParamsError("top_k", f"top_k must be >= 1, or 0 or -1 for off, got {self.top_k}")
        set_(self, "top_k", max(self.top_k, 0))
        set_(self, "min_p", _number("min_p", self.min_p))
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not (_SEED_MIN <= _integer("seed", self.seed) <= _SEED_MAX):
            raise SamplingParamsError("seed", f"seed must be an integer in [-2**63, 2**64), got {self.seed}")

        for name in ("presence_penalty", "frequency_penalty"):
            value = _number(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise SamplingParamsError(name, f"{name} must be in [-2, 2], got {value}")
            set_(self, name, value)
        set_(self, "repetition_penalty", _number("repetition_penalty", self.repetition_penalty))
        if self.repetition_penalty <= 0:
            raise SamplingParamsError(
                "repetition_penalty", f"repetition_penalty must be > 0, got {self.repetition_penalty}"
            )

        set_(self, "stop", _stop_strings(self.stop))
        set_(self, "stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.stop and not self.detokenize:
            raise SamplingParamsError("stop", "stop strings need detokenize=True: they are matched on the output text")

        if self.max_tokens is not None and _integer("max_tokens", self.max_tokens) < 1:
            raise SamplingParamsError("max_tokens", f"max_tokens must be >= 1 (or None), got {self.max_tokens}")
        if _integer("min_tokens", self.min_tokens) < 0:
            raise SamplingParamsError("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens",
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= _integer(name, value) <= MAX_LOGPROBS:
                raise SamplingParamsError(
                    name,
                    f"{name} must be in [0, {MAX_LOGPROBS}] (or None; {MAX_LOGPROBS} is OpenAI's limit), got {value}",
                )
        set_(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise SamplingParamsError(
                "structured_outputs",
                f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}",
            )

    @property
    def sampling_type(self) -> SamplingType:
        """GREEDY below temperature 1e-5; otherwise RANDOM_SEED when ``seed`` is set, else RANDOM."""
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    def child_params(self, index: int) -> SamplingParams:
        """The parameters of completion ``index`` of ``n``: ``n=1``, and ``seed + index`` when seeded.

        vLLM's ``ParentRequest`` does the same, so that the ``n`` seeded completions differ from
        each other yet are each reproducible.
        """
        if not 0 <= index < self.n:
            raise IndexError(f"completion index {index} out of range for n={self.n}")
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise ``SamplingParamsError`` if ``stop_token_ids`` or ``logit_bias`` name a token >= ``vocab_size``.

        Only the engine knows the vocabulary, so it calls this when a request arrives; the
        sampler calls it too for the requests whose ids it is about to index with.
        """
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias or {})):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise SamplingParamsError(
                    name, f"{name} has token ids outside the vocabulary (size {vocab_size}): {bad}"
                )


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SamplingParamsError(name, f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"{name} must be an integer, got {value!r}")
    return value


def _stop_strings(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise SamplingParamsError("stop", f"stop must be a non-empty string or a list of them, got {stop!r}")
    return list(stop)


def _token_ids(name: str, ids: object) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, list | tuple) or not all(not isinstance(t, bool) and isinstance(t, int) for t in ids):
        raise SamplingParamsError(name, f"{name} must be a list of integer token ids, got {ids!r}")
    if any(t < 0 for t in ids):
        raise SamplingParamsError(name, f"{name} must hold token ids >= 0, got {list(ids)}")
    return list(dict.fromkeys(ids))  # drop duplicates, keep order


def _logit_bias(bias: object) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise SamplingParamsError("logit_bias", f"logit_bias must be a dict {{token_id: bias}}, got {bias!r}")
    checked: dict[int, float] = {}
    for token_id, value in bias.items():
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise SamplingParamsError("logit_bias", f"logit_bias keys must be token ids (ints >= 0), got {token_id!r}")
        number = _number("logit_bias", value)
        if not -100 <= number <= 100:
            raise SamplingParamsError(
                "logit_bias", f"logit_bias values must be in [-100, 100], got {number} for token {token_id}"
            )
        checked[token_id] = number
    return checked
