"""HTTP server: TGI- and OpenAI-compatible routes, Prometheus metrics and the Gradio UI on one app.

Example::

    from hf_paged.server import create_app
    app = create_app(pipe, model_id="SmolLM2-135M-Instruct")
"""
from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
