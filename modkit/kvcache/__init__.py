"""The KV cache manager: block pool, prefix caching by chained block hashes, KV events."""

from modkit.kvcache.block_pool import NULL_BLOCK_ID, BlockPool, KVCacheBlock
from modkit.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, EventLog, KVEvent, KVEventSink
from modkit.kvcache.eviction import (
    EVICTION_POLICIES,
    EvictionPolicy,
    LFUEviction,
    LRUEviction,
    eviction_policies,
    register_eviction_policy,
)
from modkit.kvcache.hashing import NONE_HASH, BlockHash, hash_block_tokens, hash_request_blocks
from modkit.kvcache.manager import KVCacheManager, KVCacheStats

__all__ = [
    "EVICTION_POLICIES",
    "NONE_HASH",
    "NULL_BLOCK_ID",
    "AllBlocksCleared",
    "BlockHash",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "EventLog",
    "EvictionPolicy",
    "KVCacheBlock",
    "KVCacheManager",
    "KVCacheStats",
    "KVEvent",
    "KVEventSink",
    "LFUEviction",
    "LRUEviction",
    "eviction_policies",
    "hash_block_tokens",
    "hash_request_blocks",
    "register_eviction_policy",
]
