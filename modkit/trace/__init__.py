"""What the pipeline's components tell about their decisions, and how to keep and read it.

``events`` is the wire format (one Struct per kind of event), ``stream`` subscribes to
it (``EventStream``, ``Recorder``), ``trace`` turns a recording into DataFrames and files.
"""

from modkit.trace.events import PipelineEvent
from modkit.trace.stream import EventStream, Recorder
from modkit.trace.trace import BlockState, Trace

__all__ = ["BlockState", "EventStream", "PipelineEvent", "Recorder", "Trace"]
