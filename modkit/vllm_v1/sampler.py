"""``VLLMSampler``: modkit's sampler interface, backed by ``vllm.v1.sample.sampler.Sampler``.

Each step the sampling states become vLLM's ``SamplingMetadata`` and vLLM's own sampler
does the work; its output comes back as modkit's ``SamplerOutput``::

    states --> vllm.SamplingParams per row --> builtin logits processors (min_tokens,
           \\                                   logit_bias, min_p), fed one BatchUpdate
            --> SamplingMetadata (temperature, top_k/top_p, penalties, generators)
    logits --> grammar mask (structured outputs, modkit.sampler.grammar) --> vllm Sampler
           --> sampled (N, 1) int32 + LogprobsTensors --> modkit SamplerOutput

Where vLLM and modkit's ``DefaultSampler`` agree: raw logprobs, greedy argmax after
logit_bias / min_tokens / penalties, top_k / top_p / min_p masks, their order.

Where they differ (seen in ``tests/test_vllm_v1.py``):

- **Random draws.** On CPU vLLM does a fused Gumbel-max per row, seeded by one integer a
  row draws per step (a seeded row from its own generator, the others from torch's
  *global* generator); modkit races exponential noise it draws V numbers at a time. Same
  distribution, different tokens for the same seed. Here the global draws happen inside
  ``torch.random.fork_rng``, reseeded from this sampler's ``seed``, so the caller's global
  RNG is untouched and unseeded rows are reproducible when ``seed`` is given.
- **Compilation.** vLLM compiles the rank count of its logprobs with ``torch.compile``;
  on CPU the first call spends a long time in inductor. The sampler runs under
  ``torch.compiler.set_stance("force_eager")``: the same function, run eagerly.

NOTE: vLLM keeps the metadata in a persistent batch updated by diffs; this adapter
rebuilds it (and the logits processors) every step, like modkit's ``SamplingMetadata``.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from modkit.sampler.grammar import apply_grammar_mask, states_grammar_mask
from modkit.sampler.interface import LogprobsTensors, Sampler, SamplerOutput, SamplingState
from modkit.sampling_params import SamplingType
from modkit.vllm_v1.bridge import (
    BUILTIN_LOGITS_PROCESSORS,
    BatchUpdate,
    LogitsProcessors,
    VllmSampler,
    VllmSamplingMetadata,
    to_vllm_params,
)


class VLLMSampler(Sampler):
    """modkit's ``Sampler`` contract, computed by vLLM V1's sampler. See the module docstring."""

    name = "vllm"

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)
        self.sampler = VllmSampler(logprobs_mode="raw_logprobs")
        self._seeds = torch.Generator()  # reseeds torch's global RNG (forked) for unseeded rows
        if seed is None:
            self._seeds.seed()
        else:
            self._seeds.manual_seed(seed)

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(states), "one row of logits per sampling state"
        if not states:
            return SamplerOutput(torch.empty(0, dtype=torch.int64, device=logits.device), None, [])
        metadata = self.metadata(states, logits.shape[1], logits.device)
        devices = [logits.device] if logits.device.type == "cuda" else []
        global_seed = int(torch.randint(0, 2**62, (), generator=self._seeds))
        with torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"):
            torch.manual_seed(global_seed)
            processed = logits.to(torch.float32, copy=True)
            # Structured outputs: vLLM masks in its model runner, before its sampler; so here.
            if (grammar := states_grammar_mask(states, logits.shape[1], logits.device)) is not None:
                apply_grammar_mask(processed, grammar)
            out = self.sampler(processed, metadata)
        sampled = out.sampled_token_ids.view(-1).to(torch.int64)  # (N,)
        logprobs = None
        if out.logprobs_tensors is not None:
            lp = out.logprobs_tensors
            logprobs = LogprobsTensors(
                logprob_token_ids=lp.logprob_token_ids.to(torch.int64),  # (N, 1 + K)
                logprobs=lp.logprobs,  # (N, 1 + K)
                selected_token_ranks=lp.selected_token_ranks.to(torch.int64),  # (N,)
            )
        return SamplerOutput(sampled, logprobs, [s.params.logprobs for s in states])

    @staticmethod
    def metadata(states: Sequence[SamplingState], vocab_size: int, device: torch.device) -> VllmSamplingMetadata:
        """vLLM's ``SamplingMetadata`` for one step of ``states``, built as its input batch would build it."""
        num_rows = len(states)
        vparams = [to_vllm_params(s.params, s.eos_token_ids) for s in states]
        greedy = [s.params.sampling_type == SamplingType.GREEDY for s in states]
        # vLLM's input batch: 0 temperature marks a greedy row; top_k == V means off.
        temperature = [0.0 if g else s.params.temperature for s, g in zip(states, greedy, strict=True)]
        top_k = [s.params.top_k if 0 < s.params.top_k < vocab_size else vocab_size for s in states]
        top_p = [s.params.top_p for s in states]
        outputs = [list(s.output_token_ids) for s in states]

        # The builtin processors (min_tokens, logit_bias, min_p) are stateful; a fresh set
        # learns the whole batch from one BatchUpdate that adds every row. Only min_p reads
        # the config, for the batch capacity.
        capacity: Any = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=num_rows))
        processors = LogitsProcessors(cls(capacity, device, False) for cls in BUILTIN_LOGITS_PROCESSORS)
        prompts = [list(s.prompt_token_ids) for s in states]
        added = [(i, vparams[i], prompts[i], outputs[i]) for i in range(num_rows)]
        batch = BatchUpdate(batch_size=num_rows, removed=[], added=added, moved=[])
        for processor in processors.all:
            processor.update_state(batch)

        penalties = [(p.presence_penalty, p.frequency_penalty, p.repetition_penalty) for p in vparams]
        no_penalties = all(p == (0.0, 0.0, 1.0) for p in penalties)
        prompt_ids = None
        if not no_penalties:
            width = max(len(s.prompt_token_ids) for s in states)
            padded = [list(s.prompt_token_ids) + [vocab_size] * (width - len(s.prompt_token_ids)) for s in states]
            prompt_ids = torch.tensor(padded, dtype=torch.int64, device=device)  # (N, Lp), padded with V

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        def ints(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        logprobs = [s.params.logprobs for s in states]
        return VllmSamplingMetadata(
            temperature=None if all(greedy) else floats(temperature),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            top_p=None if all(p >= 1.0 for p in top_p) else floats(top_p),
            top_k=None if all(k == vocab_size for k in top_k) else ints(top_k),
            generators={i: s.generator for i, s in enumerate(states) if s.generator is not None and not greedy[i]},
            max_num_logprobs=max((k for k in logprobs if k is not None), default=None),
            no_penalties=no_penalties,
            prompt_token_ids=prompt_ids,
            presence_penalties=floats([p[0] for p in penalties]),
            frequency_penalties=floats([p[1] for p in penalties]),
            repetition_penalties=floats([p[2] for p in penalties]),
            output_token_ids=outputs,
            allowed_token_ids_mask=None,
            bad_words_token_ids={},
            logitsprocs=processors,
        )
