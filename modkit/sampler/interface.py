"""The contract between the engine and a sampler.

Each step the model runner produces one row of logits per request that needs a token (the
last position of a decode, or the last chunk of a prompt), and the sampler turns them into
token ids::

    logits (N, V) float32  +  states[0..N)  -->  Sampler.sample  -->  SamplerOutput
    row i belongs to states[i]                                        sampled_token_ids (N,) int64
                                                                      logprobs (rows that asked)

The engine owns one ``SamplingState`` per request, for the request's whole life: it creates
it with ``SamplingState.create`` when the request arrives, appends every sampled token to
``state.output_token_ids`` after each step, and drops it when the request finishes. The
sampler reads states and never changes them, except that drawing a seeded row's noise
advances that row's generator, and a constrained row's grammar matcher is advanced to the
row's output tokens. Hence, for a seeded request, the token drawn at step ``t``
depends only on its seed, its logits, its tokens so far and ``t``, not on the batch around it.

A sampler must, for every row:

1. report logprobs (when asked) of the *raw* logits it was given (vLLM's default
   ``raw_logprobs``), whatever it does to the logits afterwards;
2. mask every token a row's grammar does not allow next (structured outputs, ``grammar.py``),
   then apply ``logit_bias``, then the ``min_tokens`` mask, then the repetition / frequency /
   presence penalties: these change which token is most likely, so they apply to greedy rows too;
3. greedy rows (``temperature < 1e-5``): take the argmax;
4. random rows: divide by ``temperature``, then apply the ``min_p``, ``top_k`` and ``top_p``
   masks, then draw from what is left, with a seeded row's noise from its own generator.

Finishing (eos, ``stop_token_ids``, ``max_tokens``, stop strings, ``ignore_eos``) is the
engine's business, not the sampler's.

Output stays on the device until ``SamplerOutput.to_lists()``, which moves everything to the
host in one copy: the one device-to-host synchronisation of a step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from modkit.logprobs import TokenLogprobs
from modkit.registry import Registry
from modkit.sampling_params import SamplingParams, SamplingType

if TYPE_CHECKING:  # metadata.py and grammar.py import this module
    from modkit.sampler.grammar import RequestGrammar
    from modkit.sampler.metadata import RowParams


@dataclass(slots=True)
class SamplingState:
    """Everything the sampler needs to know about one request, kept by the request's owner."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    """Tokens generated so far. The engine appends each step's token; the sampler only reads it
    (for penalties and ``min_tokens``)."""
    generator: torch.Generator | None = None
    """The request's own random generator: set for seeded random requests, None otherwise. It
    must live on the device of the logits."""
    eos_token_ids: tuple[int, ...] = ()
    """The model's end-of-sequence ids. The sampler masks them, with ``stop_token_ids``, until
    ``min_tokens`` is reached (even under ``ignore_eos``, as vLLM does)."""
    grammar: RequestGrammar | None = field(default=None, compare=False, repr=False)
    """The request's grammar matcher (``params.structured_outputs``), made by the engine's
    ``GrammarBackend``; None for free text. The sampler advances it to ``output_token_ids``."""
    row: RowParams | None = field(default=None, compare=False, repr=False)
    """What ``params`` contribute to a step's sampling tensors, read once for the request's
    life (``SamplingMetadata``; ``params`` never change)."""

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        device: torch.device | str,
        eos_token_ids: Sequence[int] = (),
        grammar: RequestGrammar | None = None,
    ) -> SamplingState:
        """A fresh state; seeded random requests get a generator on ``device`` seeded with ``params.seed``."""
        assert (grammar is None) == (params.structured_outputs is None), "a grammar exactly for structured outputs"
        generator = None
        if params.sampling_type == SamplingType.RANDOM_SEED:
            assert params.seed is not None
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        return cls(params, list(prompt_token_ids), [], generator, tuple(eos_token_ids), grammar)

    @property
    def reads_output_tokens(self) -> bool:
        """Whether the default sampler reads this row's output tokens: their values (a penalty, a
        grammar) or their count (``min_tokens`` not yet reached). Rows that do not can be sampled
        before the last step's token reaches ``output_token_ids`` (``Sampler.can_sample_ahead``)."""
        params = self.params
        penalised = params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
        return bool(penalised) or self.grammar is not None or len(self.output_token_ids) < params.min_tokens

    @property
    def min_tokens_masked_ids(self) -> list[int]:
        """Token ids the sampler must mask now: eos and stop ids while the output is shorter than ``min_tokens``."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return []
        return list(dict.fromkeys((*self.eos_token_ids, *self.params.stop_token_ids)))


@dataclass(slots=True)
class LogprobsTensors:
    """Logprobs of a batch, on the device (vLLM's ``LogprobsTensors``).

    Column 0 is the sampled token; columns 1..K are the K most likely tokens, most likely
    first, where K is the largest ``logprobs`` asked for in the batch. Every row gets K
    columns; ``SamplerOutput.to_lists`` trims each row to its own count.
    """

    logprob_token_ids: torch.Tensor  # (N, 1 + K) int64
    logprobs: torch.Tensor  # (N, 1 + K) float32, log_softmax of the raw logits
    selected_token_ranks: torch.Tensor  # (N,) int64, rank of the sampled token: 1 = most likely

    @property
    def num_top(self) -> int:
        """K, the number of top alternatives held per row."""
        return self.logprob_token_ids.shape[1] - 1


@dataclass(slots=True)
class SampledToken:
    """One row of a step's result, on the host: what the engine appends to its request."""

    token_id: int
    logprobs: TokenLogprobs | None  # None when the request did not ask for logprobs


@dataclass(slots=True)
class SamplerOutput:
    """A step's sampled tokens, still on the logits' device until ``to_lists``."""

    sampled_token_ids: torch.Tensor  # (N,) int64
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs
    num_logprobs: list[int | None]  # per row, its ``params.logprobs`` (host-side, for trimming)
    _host: torch.Tensor | None = None  # the packed copy on the host, once ``start_copy_to_host`` queued it
    _copied: torch.cuda.Event | None = None  # the CUDA event that marks that copy done

    def start_copy_to_host(self) -> None:
        """Queue the one device->host copy now, right behind this step's sampling.

        Queued later (in ``to_lists``), it would wait behind whatever was launched after the
        step on the same stream: with the next step launched ahead, behind that whole forward.
        """
        packed = self._packed()
        if not packed.is_cuda:
            return
        self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        self._host.copy_(packed, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def _packed(self) -> torch.Tensor:
        """Everything the host needs in one int64 tensor: (N, 1) without logprobs, else (N, 4 + 2K).

        NOTE: one device->host copy, not four. The float32 logprobs travel as their 32-bit
        patterns, which survive the int64 round trip exactly, and are viewed as floats again
        on the host.
        """
        lp = self.logprobs
        if lp is None:
            return self.sampled_token_ids.unsqueeze(1)
        return torch.cat(
            [
                self.sampled_token_ids.unsqueeze(1),  # (N, 1)
                lp.selected_token_ranks.unsqueeze(1),  # (N, 1)
                lp.logprob_token_ids,  # (N, 1 + K)
                lp.logprobs.view(torch.int32).to(torch.int64),  # (N, 1 + K)
            ],
            dim=1,
        )

    def to_lists(self) -> list[SampledToken]:
        """Bring everything to the host (waiting for the copy) and split it into one ``SampledToken`` per row."""
        if self._copied is not None:
            self._copied.synchronize()
            packed = self._host
        else:
            packed = self._packed().cpu()
        assert packed is not None
        token_ids = packed[:, 0].tolist()
        lp = self.logprobs
        if lp is None:
            return [SampledToken(t, None) for t in token_ids]
        width = 1 + lp.num_top
        ranks = packed[:, 1].tolist()
        ids = packed[:, 2 : 2 + width].tolist()
        logprobs = packed[:, 2 + width :].to(torch.int32).view(torch.float32).tolist()
        rows: list[SampledToken] = []
        for i, (token_id, k) in enumerate(zip(token_ids, self.num_logprobs, strict=True)):
            if k is None:
                rows.append(SampledToken(token_id, None))
                continue
            top = TokenLogprobs(logprobs[i][0], ranks[i], ids[i][1 : 1 + k], logprobs[i][1 : 1 + k])
            rows.append(SampledToken(token_id, top))
        return rows


class Sampler(ABC):
    """Turns a step's logits into tokens. See the module docstring for the contract.

    ``seed`` seeds the generator that unseeded random rows draw from; None seeds it from the
    operating system, so two samplers built with None draw different tokens.
    """

    name: ClassVar[str]

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    @abstractmethod
    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        """Sample one token per row of ``logits`` (N, V) float32; row i belongs to ``states[i]``.

        Must not modify ``logits`` or ``states`` (seeded rows' generators advance).
        """

    def can_sample_ahead(self, states: Sequence[SamplingState]) -> bool:
        """Whether ``sample`` may run on these rows while the step before is still on the device:
        their ``output_token_ids`` then lack that step's token. No, unless an implementation
        knows what it reads (a swapped-in sampler may read anything)."""
        return False


SAMPLERS: Registry[Sampler] = Registry("sampler")
register_sampler = SAMPLERS.register
# vLLM's own sampler, behind this interface; imported (with vLLM, seconds) only when asked for.
SAMPLERS.register_path("vllm", "modkit.vllm_v1.sampler:VLLMSampler")


def get_sampler(name: str = "default", seed: int | None = None) -> Sampler:
    """An instance of the sampler registered under ``name``."""
    return SAMPLERS.get(name)(seed=seed)


def samplers() -> list[str]:
    """Names of every registered sampler."""
    return SAMPLERS.names()
