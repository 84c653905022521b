"""Run the worker alone: ``python -m modkit.worker [--ipc-dir DIR] [--port N] [config flags]``. Needs ``--worker-id``.

See ``modkit.pipeline.standalone``.
"""

from modkit.pipeline.standalone import run_component

if __name__ == "__main__":
    run_component("worker")
