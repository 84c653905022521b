"""The frontend: the OpenAI-compatible HTTP API (FastAPI) in front of the engine."""

from modkit.frontend.app import APIError, build_app
from modkit.model.loader import EMBEDDED_MODEL_NAME

__all__ = ["EMBEDDED_MODEL_NAME", "APIError", "build_app"]
