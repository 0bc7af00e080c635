"""One guard around every route: whatever goes wrong, the answer is the documented JSON error, the
failure is counted once under its label, and no concurrency slot is left behind.

- An :class:`~hf_paged.server.errors.APIError` (bad input, overload, shutdown) passes through and is
  counted under :func:`~hf_paged.server.errors.failure_label`.
- Anything else is our bug: logged with its traceback, counted as ``internal`` and answered 500 with
  ``error_type: "internal"``.
- Slots are the routes' own business (:meth:`Permit.held_until_handed_over` releases them on any
  error before a response owns them); the guard only counts and translates.

Example::

    @router.post("/generate")
    @guarded()
    async def generate(req: GenerateRequest, request: Request) -> Response: ...
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from .errors import APIError, ClientGone, failure_label, internal_error

logger = logging.getLogger(__name__)


def guarded(*, counted: bool = True) -> Callable:
    """Decorate a route taking ``request: Request``. ``counted``: the route is a generation request
    (``tgi_request_count`` and ``tgi_request_failure``); ``/tokenize`` is not, as in TGI."""

    def decorate(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(route)  # FastAPI reads the wrapped signature for parameters
        async def run(*args: Any, **kwargs: Any) -> Any:
            request: Request = kwargs["request"]
            metrics = request.app.state.hf_paged.metrics
            if counted:
                metrics.request()
            try:
                return await route(*args, **kwargs)
            except ClientGone:
                raise  # the generation counted it as cancelled
            except APIError as exc:
                label = failure_label(exc)
                if counted and label is not None:
                    metrics.failure(label)
                raise
            except Exception as exc:
                logger.exception("%s %s failed", request.method, request.url.path)
                if counted:
                    metrics.failure("internal")
                raise internal_error(exc) from None

        return run

    return decorate
