"""``python -m modkit.kvcache [--ipc-dir DIR] [--port N] [config flags]``: run the KV cache manager alone.

It sizes one block pool per worker from the worker's own KV cache, so it waits for the
workers to answer (see ``modkit.pipeline.standalone``).
"""

from modkit.pipeline.standalone import run_component

if __name__ == "__main__":
    run_component("kv_cache_manager")
