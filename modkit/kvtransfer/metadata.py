"""What a plan tells a worker's KV connector: the blocks to save, the blocks to load."""

from __future__ import annotations

import msgspec


class LoadSpec(msgspec.Struct, frozen=True):
    """Blocks a decode worker reads from a prefill worker before this step's forward.

    The prefill worker kept the request's whole block table; the decode worker reads blocks
    ``first_block`` ... ``first_block + num_blocks - 1`` of it into the same positions of its
    own table (the blocks before ``first_block`` it already caches: a prefix hit).
    """

    src_worker_id: int
    first_block: int
    num_blocks: int


class KVConnectorMetadata(msgspec.Struct, frozen=True):
    """vLLM's ``KVConnectorMetadata``: built by the scheduler side, carried in the plan."""

    reqs_to_save: dict[str, list[int]] = {}  # req_id -> its block table: its prompt is computed this step
    reqs_to_load: dict[str, LoadSpec] = {}  # req_id -> where its remotely computed blocks are

    def __bool__(self) -> bool:
        return bool(self.reqs_to_save or self.reqs_to_load)
