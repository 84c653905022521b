"""The six-process pipeline: ``Pipeline`` launches, watches and stops it (see ``launcher``)."""

from __future__ import annotations

from typing import Any

__all__ = ["Pipeline", "PipelineAddresses"]


def __getattr__(name: str) -> Any:  # lazy: components import ``addresses`` without the launcher
    if name == "Pipeline":
        from modkit.pipeline.launcher import Pipeline

        return Pipeline
    if name == "PipelineAddresses":
        from modkit.pipeline.addresses import PipelineAddresses

        return PipelineAddresses
    raise AttributeError(name)
