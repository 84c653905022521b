"""The frontend: the OpenAI-compatible HTTP API (FastAPI) in front of the engine.

The app itself is ``modkit.frontend.app.build_app``; it is not imported here, so a module
that needs only the frontend's interface or its OpenAI types does not load FastAPI.
"""

from modkit.model.loader import EMBEDDED_MODEL_NAME

__all__ = ["EMBEDDED_MODEL_NAME"]
