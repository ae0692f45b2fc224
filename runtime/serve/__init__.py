"""``python -m runtime.serve``: the runtime as an HTTP service (OpenAI-style chat with video). ``app(...)`` is the
ASGI app, for any ASGI server; see ``runtime.serve.app``."""

from __future__ import annotations

from runtime.serve.app import app

__all__ = ["app"]
