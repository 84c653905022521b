"""What the scheduler needs from a KV cache manager, in one process or behind ZeroMQ.

``KVCacheManager`` (this process) and ``KVCacheManagerClient`` (the KV cache manager
process, over RPC) both satisfy ``KVCacheManagerInterface``; the scheduler cannot tell
which one it holds. The contract, in vLLM V1's words:

- ``get_computed_blocks(request)`` -> (hit blocks, tokens they hold): the request's leading
  full blocks found in the prefix cache, at most ``num_tokens - 1`` tokens (the last token is
  always computed: its logits give the next token). The blocks are opaque handles
  (``BlockHandles``): the caller only passes them back to ``allocate_slots``.
- ``allocate_slots(request, num_new_tokens, hit_blocks, num_hit_tokens)`` -> how many new
  blocks the request got (0 when the blocks it holds have room), or None, changing nothing,
  when too few blocks are free. Afterwards the request's blocks cover ``num_computed_tokens
  + num_hit_tokens + num_new_tokens`` tokens, and ``get_block_ids(req_id)`` is exactly the
  block table the worker runs the model on.
- ``cache_blocks(request, num_computed_tokens)``: after a forward, make its computed full
  blocks findable by hash. ``free(request)``: give all its blocks back.
- ``prepare_admissions(requests, token_budget)``: a hint, given before the scheduler admits
  waiting requests. The scheduler is about to call ``get_computed_blocks`` and then
  ``allocate_slots`` for each of ``requests`` in turn, each for what the ones before left of
  ``token_budget``, stopping at the first that does not fit. A manager in another process
  does them all in one round trip and answers the calls from its reply; one in this process
  does nothing.
- ``flush()``: make every earlier call take effect (a no-op in-process; a remote manager
  batches the calls that return nothing).

Invariants (``check_invariants``): every block is free or held; a block's reference count is
the number of block tables that hold it; free + held == total.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from modkit.kvcache.hashing import BlockHash

# What get_computed_blocks hands out and allocate_slots takes back: KVCacheBlocks in this
# process, block ids in the client of the KV cache manager process. The scheduler never looks inside.
BlockHandles = Sequence[object]


class KVRequest(Protocol):
    """The parts of a request the KV cache manager reads (``modkit.request.Request`` has them)."""

    req_id: str
    num_computed_tokens: int
    all_token_ids: list[int]
    block_hashes: list[BlockHash]

    @property
    def num_tokens(self) -> int: ...


@runtime_checkable
class KVCacheManagerInterface(Protocol):
    block_size: int

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (vllm:kv_cache_usage_perc)."""
        ...

    def get_computed_blocks(self, request: KVRequest) -> tuple[BlockHandles, int]: ...

    def allocate_slots(
        self,
        request: KVRequest,
        num_new_tokens: int,
        new_computed_blocks: BlockHandles = (),
        num_new_computed_tokens: int = 0,
    ) -> int | None: ...

    def cache_blocks(self, request: KVRequest, num_computed_tokens: int) -> None: ...

    def free(self, request: KVRequest) -> None: ...

    def get_block_ids(self, req_id: str, start: int = 0) -> list[int]: ...

    def held_req_ids(self) -> set[str]: ...

    def prepare_admissions(self, requests: Sequence[KVRequest], token_budget: int) -> None: ...

    def flush(self) -> None: ...

    def check_invariants(self) -> None: ...
