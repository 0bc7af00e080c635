"""What crosses the wire as text: JSON that is always valid, and Unicode text that always is.

Two rules, applied the same way on every route:

- **JSON out never carries NaN or Infinity** (they are not JSON, and most clients refuse them). Every
  response body and SSE frame goes through :func:`dumps`; a non-finite float that got this far
  (a bug upstream: the sampler already keeps log-probabilities finite) becomes ``null``.
- **Text in must be valid Unicode.** JSON's ``\\ud800`` escapes can smuggle a lone UTF-16 surrogate
  into a Python string, which no tokenizer can encode. :func:`lone_surrogate` (the engine's own check,
  re-exported) finds one anywhere in a decoded body, so the schemas reject it with a 422 naming the field.

Example::

    dumps({"logprob": float("nan")})     # '{"logprob":null}'
    lone_surrogate(["ok", {"x": "a\\ud800"}])  # '\\ud800'
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any

from starlette.responses import JSONResponse as _StarletteJSON

from ..engine.params import lone_surrogate

__all__ = ["JSONResponse", "dumps", "lone_surrogate"]

logger = logging.getLogger(__name__)

def dumps(data: Any) -> str:
    """Compact JSON text; non-finite floats become ``null`` (logged: they mean a bug upstream)."""
    try:
        return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        logger.warning("non-finite float in a response body, sent as null")
        return json.dumps(_finite(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


class JSONResponse(_StarletteJSON):
    """Starlette's JSONResponse with :func:`dumps` (never NaN, never a 500 for an odd float)."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")
