"""One guard around every route: whatever goes wrong, the answer is the documented JSON error, the
request is counted once under one outcome, and no concurrency slot is left behind.

- An :class:`~hf_paged.server.errors.APIError` (bad input, overload, shutdown) passes through and is
  counted under :func:`~hf_paged.server.errors.failure_label`.
- Anything else is our bug: logged with its traceback, counted as ``internal`` and answered 500 with
  ``error_type: "internal"``.
- Each counted request gets an :class:`Outcome` (``request.state.outcome``): its generations and
  the guard report failures into it, and it is counted once when the answer was built (or, for a
  stream, when the stream ended): ``tgi_request_count`` = successes + failures, always.
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
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)


class Outcome:
    """How one counted HTTP request ended: the first failure reported, else success; counted once,
    by :meth:`finish`. A bug (``internal``) outranks the ``cancelled`` that its own cleanup reports."""

    def __init__(self, metrics: ServerMetrics, counted: bool = True) -> None:
        self.metrics = metrics
        self.failure: str | None = None
        self.finished = not counted
        self.generations: list[dict[str, float]] = []  # timings of each finished engine request

    def fail(self, label: str) -> None:
        if self.failure is None or (label == "internal" and self.failure == "cancelled"):
            self.failure = label

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.failure is not None:
            self.metrics.failure(self.failure)
        else:
            self.metrics.success(self.generations)


def guarded(*, counted: bool = True) -> Callable:
    """Decorate a route taking ``request: Request``. ``counted``: the route is a generation request
    (``tgi_request_count`` and ``tgi_request_failure``); ``/tokenize`` is not, as in TGI."""

    def decorate(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(route)  # FastAPI reads the wrapped signature for parameters
        async def run(*args: Any, **kwargs: Any) -> Any:
            request: Request = kwargs["request"]
            outcome = request.state.outcome = Outcome(request.app.state.hf_paged.metrics, counted)
            if counted:
                outcome.metrics.request()
            response = None
            try:
                response = await route(*args, **kwargs)
                return response
            except ClientGone:
                outcome.fail("cancelled")
                raise
            except APIError as exc:
                outcome.fail(failure_label(exc))
                raise
            except Exception as exc:
                logger.exception("%s %s failed", request.method, request.url.path)
                outcome.fail("internal")
                raise internal_error(exc) from None
            finally:
                if not getattr(response, "counts_its_outcome", False):  # a stream counts when it ends
                    outcome.finish()

        return run

    return decorate
