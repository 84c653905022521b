"""A request as the engine tracks it: tokens so far, how many are computed, and its status.

vLLM V1's central idea lives here: there is no prefill phase and no decode phase. A request
has ``num_tokens`` (prompt + output so far) and ``num_computed_tokens`` (how many of those
have their keys and values in the KV cache); each step the scheduler lets the second catch
up with the first by some number of tokens. A new prompt is far behind, a decoding request
is one token behind (the token it just sampled).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from modkit.kvcache.hashing import BlockHash
from modkit.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is. The order matters: every status after PREEMPTED is a finished one."""

    WAITING = 0  # not yet admitted, or admitted and preempted: waits for blocks and budget
    RUNNING = 1  # holds blocks and is scheduled every step until it finishes
    PREEMPTED = 2  # lost its blocks to make room; back in the waiting queue, recomputed later
    FINISHED_STOPPED = 3  # eos, a stop token id or a stop string
    FINISHED_LENGTH_CAPPED = 4  # max_tokens, or the model's length limit
    FINISHED_ABORTED = 5  # cancelled by the client, or failed

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI / vLLM name: 'stop', 'length' or 'abort'."""
        return _FINISH_REASONS.get(int(self))


_FINISH_REASONS = {3: "stop", 4: "length", 5: "abort"}  # RequestStatus -> finish_reason


def check_prompt(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int) -> None:
    """ValueError (or SamplingParamsError) for a request no engine should queue: a token id
    outside the vocabulary."""
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    params.check_token_ids(vocab_size)


@dataclass(slots=True, eq=False)
class Request:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.time)
    priority: int = 0  # lower is more urgent, as in vLLM
    max_tokens: int = 0  # resolved limit on output tokens (sampling_params.max_tokens, capped by the model)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output, kept in step
    num_computed_tokens: int = 0
    # Tokens being sampled in steps not yet back (async scheduling): the scheduler plans the next
    # step before the last one's tokens arrive, counting each as a placeholder (vLLM's name).
    num_output_placeholders: int = 0
    num_cached_tokens: int | None = None  # prefix-cache hit when first scheduled; None before that
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that finished it
    block_hashes: list[BlockHash] = field(default_factory=list)  # of its full blocks, grows with it

    def __post_init__(self) -> None:
        assert self.prompt_token_ids, "a request needs at least one prompt token"
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token_ids(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
