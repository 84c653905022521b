"""The frontend: the OpenAI-compatible HTTP API (FastAPI) in front of the engine."""

from modkit.frontend.app import APIError, build_app

EMBEDDED_MODEL_NAME = "modkit/tiny-chat"  # the name the embedded model is served under

__all__ = ["EMBEDDED_MODEL_NAME", "APIError", "build_app"]
