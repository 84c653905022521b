"""Run the scheduler alone: ``python -m modkit.scheduler [--ipc-dir DIR] [--port N] [config flags]``.

See ``modkit.pipeline.standalone``.
"""

from modkit.pipeline.standalone import run_component

if __name__ == "__main__":
    run_component("scheduler")
