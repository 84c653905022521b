"""The smallest engine that runs on the paged forward: every prompt at once, then greedy decode.

There is no scheduler and no KV cache manager here: each request gets enough blocks for
its prompt plus ``max_new_tokens`` up front, and all requests step together until each has
hit an end-of-sequence token or its limit. It exists to check the model and the paged
forward end to end (and to compare with ``transformers``' ``generate``); the real engine,
with scheduling and block management, is built on the same ``ModelRunner``.
"""

from __future__ import annotations

from collections.abc import Sequence

from modkit.worker.model_runner import ModelRunner, SequenceChunk


def greedy_generate(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Greedy continuation of each prompt; the eos token, when reached, ends the output."""
    block_size = runner.kv_cache.block_size
    tables: list[list[int]] = []
    next_block = 0
    for prompt in prompts:
        needed = -(-(len(prompt) + max_new_tokens) // block_size)
        tables.append(list(range(next_block, next_block + needed)))
        next_block += needed
    if next_block > runner.kv_cache.num_blocks:
        raise ValueError(f"these requests need {next_block} blocks; the cache has {runner.kv_cache.num_blocks}")

    outputs: list[list[int]] = [[] for _ in prompts]
    # First step: each whole prompt. Later steps: the token each request sampled last.
    pending = {i: SequenceChunk(list(p), 0, tables[i]) for i, p in enumerate(prompts)}
    while pending:
        order = list(pending)
        logits = runner.execute([pending[i] for i in order])
        next_tokens = logits.argmax(dim=-1).tolist()
        for i, token in zip(order, next_tokens, strict=True):
            outputs[i].append(token)
            chunk = pending.pop(i)
            if token in eos_token_ids or len(outputs[i]) == max_new_tokens:
                continue
            computed = chunk.num_computed_tokens + len(chunk.token_ids)
            pending[i] = SequenceChunk([token], computed, tables[i])
    return outputs
