"""Content hashes of full KV blocks, for prefix caching.

A block's hash covers its own tokens *and*, through the parent hash, every token before
it, so two requests share a cached block only when their whole prefixes agree::

    hash(block i) = H(hash(block i-1), token ids of block i, extra keys)
    hash(block -1) = NONE_HASH (the root)

SHA-256 of a fixed byte encoding, not Python's ``hash``: Python salts string hashes per
process, and the router and KV manager in other processes must agree on every hash.
Only *full* blocks are hashed; the partly filled last block of a request never is.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

NONE_HASH = BlockHash(hashlib.sha256(b"modkit:root-block-hash").digest())


def hash_block_tokens(
    parent_block_hash: BlockHash,
    token_ids: Sequence[int],
    extra_keys: tuple[str | int, ...] | None = None,
) -> BlockHash:
    """Hash of one full block, chained to its parent's hash."""
    h = hashlib.sha256(parent_block_hash)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra_keys:
        # Extra keys (a LoRA name, a cache salt...) make otherwise equal blocks distinct.
        h.update(repr(extra_keys).encode())
    return BlockHash(h.digest())


def hash_request_blocks(
    token_ids: Sequence[int],
    block_size: int,
    known: list[BlockHash],
    extra_keys: tuple[str | int, ...] | None = None,
) -> list[BlockHash]:
    """Extend ``known`` (the hashes of a request's first blocks) to every full block of ``token_ids``.

    Called each time a request grows; only the blocks that became full since are hashed.
    """
    parent = known[-1] if known else NONE_HASH
    for start in range(len(known) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], extra_keys)
        known.append(parent)
    return known
