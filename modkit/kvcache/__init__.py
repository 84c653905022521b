"""The KV cache manager: block pool, prefix caching by chained block hashes, KV events."""

from modkit.kvcache.block_pool import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVCacheBlock
from modkit.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, EventLog, KVEvent, KVEventSink
from modkit.kvcache.hashing import NONE_HASH, BlockHash, hash_block_tokens, hash_request_blocks
from modkit.kvcache.manager import KVCacheManager, KVCacheStats

__all__ = [
    "NONE_HASH",
    "NULL_BLOCK_ID",
    "AllBlocksCleared",
    "BlockHash",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "EventLog",
    "FreeBlockQueue",
    "KVCacheBlock",
    "KVCacheManager",
    "KVCacheStats",
    "KVEvent",
    "KVEventSink",
    "hash_block_tokens",
    "hash_request_blocks",
]
