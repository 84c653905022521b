"""Python's garbage collector and a serving loop: the heap that exists when the loop starts is frozen.

A full collection (generation 2) walks every container object the process holds. After
loading a model, a tokenizer and the KV cache manager's blocks that is a very large
number of objects, and one full collection stops the loop for many decode steps' worth of
time, whenever enough new objects have piled up (the scheduler's step records do, every
step). ``gc.freeze()`` moves every object alive now out of
the collector's sight, so later collections walk only what the loop itself made. vLLM
freezes its engine's startup heap for the same reason.

``gc.unfreeze()`` when the loop ends hands the objects back, so nothing frozen here is
kept alive for good (an ``LLM`` deleted in a notebook frees its GPU memory as before).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze the objects alive now for the duration of the block.

    NOTE: ``gc.unfreeze`` hands back every frozen object, also those someone froze before
    (on a GPU box some library leaves a few hundred frozen; seen on the H100): only how
    often the collector looks at them changes, and nothing stays frozen for good.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
