"""KV cache events in vLLM's format, for routers and live views that mirror the cache.

vLLM publishes these over ZeroMQ (``vllm/distributed/kv_events.py``); a KV-aware router
learns from them which prefixes each worker holds. Here they go to a pluggable sink: any
callable taking one event. ``EventLog`` is a sink that keeps them in a list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from modkit.kvcache.hashing import BlockHash


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks whose KV was computed and can now be found by hash (prefix-cache entries)."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None  # None when the first block starts the request
    token_ids: list[int]  # every token of the stored blocks, in order
    block_size: int
    lora_id: int | None = None
    medium: str | None = "cpu"


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Cached blocks that were evicted: their hashes no longer find anything."""

    block_hashes: list[BlockHash]
    medium: str | None = "cpu"


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
KVEventSink = Callable[[KVEvent], None]


def apply_kv_event(cached: set[BlockHash], event: KVEvent) -> None:
    """Update ``cached``, the hashes a pool's prefix cache can find, with one of its events.

    The router mirrors each worker's cache this way, and the KV cache manager keeps the same
    mirror of each pool, which it hands out as a snapshot (``KVCacheService.kv_snapshot``)."""
    if isinstance(event, BlockStored):
        cached.update(event.block_hashes)
    elif isinstance(event, BlockRemoved):
        cached.difference_update(event.block_hashes)
    elif isinstance(event, AllBlocksCleared):
        cached.clear()


# Block activity, for views that draw the pool: (kind, req_id, block ids). Unlike vLLM's
# events above, which say what the cache *holds*, these say who did what to which block:
# "allocated", "hit", "cached", "freed", "evicted" (to make room for req_id), "cleared".
BlockActivitySink = Callable[[str, "str | None", list[int]], None]


@dataclass(slots=True)
class EventLog:
    """A sink that keeps every event; ``take()`` hands them over and starts afresh."""

    events: list[KVEvent] = field(default_factory=list)

    def __call__(self, event: KVEvent) -> None:
        self.events.append(event)

    def take(self) -> list[KVEvent]:
        taken, self.events = self.events, []
        return taken


_KINDS: dict[str, type[BlockStored] | type[BlockRemoved] | type[AllBlocksCleared]] = {
    "BlockStored": BlockStored,
    "BlockRemoved": BlockRemoved,
    "AllBlocksCleared": AllBlocksCleared,
}


def event_to_wire(event: KVEvent) -> list[str | KVEvent]:
    """``[kind, event]``: the three event dataclasses share field names, so the kind travels with them."""
    return [type(event).__name__, event]


def event_from_wire(value: object) -> KVEvent:
    """The event ``event_to_wire`` encoded, after msgpack; ValueError for anything else."""
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not isinstance(value[0], str):
        raise ValueError(f"not a KV event: {value!r:.200}")
    kind, fields = value
    try:
        return msgspec.convert(fields, _KINDS[kind])
    except (KeyError, TypeError, ValueError, msgspec.ValidationError) as error:
        raise ValueError(f"not a KV event: {value!r:.200}") from error
