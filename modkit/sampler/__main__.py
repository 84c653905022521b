"""Run the sampler alone: ``python -m modkit.sampler [--ipc-dir DIR] [--port N] [config flags]``.

See ``modkit.pipeline.standalone``.
"""

from modkit.pipeline.standalone import run_component

if __name__ == "__main__":
    run_component("sampler")
