"""The prompts of one request, each an engine request of its own, and their delta streams.

A chat request has one prompt; a completions request may have a batch (``prompt`` as a
list). Each prompt is submitted as its own engine request (with its ``n`` completions), and
the response waits for every prompt's first delta before it answers (so a refusal is still
a 400, not an error inside a stream), then reads the streams as they come: ``merged`` yields
each delta with its prompt's index. Leaving early closes every stream, which aborts its
engine request and frees its blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from modkit.engine.output_processor import CompletionDelta

Deltas = AsyncIterator[CompletionDelta]


@dataclass(frozen=True, slots=True)
class Prompt:
    ids: list[int]
    text: str | None  # as the client sent it; None for token ids (and chat, whose text is the template's)


async def first_deltas(
    streams: list[Deltas], first: Callable[[Deltas], Awaitable[CompletionDelta]]
) -> list[CompletionDelta]:
    """``first(stream)`` of every stream, awaited together. If one raises, every stream is closed
    (their requests aborted) and the error propagates."""
    if len(streams) == 1:
        return [await first(streams[0])]
    tasks = [asyncio.ensure_future(first(stream)) for stream in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)
        raise


async def close_all(streams: list[Deltas]) -> None:
    """Close each stream now (an async generator's ``aclose``), which aborts its request."""
    for stream in streams:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


async def merged(streams: list[Deltas]) -> AsyncIterator[tuple[int, CompletionDelta]]:
    """(prompt index, delta) from every stream, in the order they come; the first error raised by
    any stream propagates, and leaving early closes them all."""
    if len(streams) == 1:  # no tasks for the common case
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, CompletionDelta | Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: Deltas) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        except Exception as err:
            queue.put_nowait((i, err))
            return
        queue.put_nowait((i, None))  # this stream is done

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
