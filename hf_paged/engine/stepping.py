"""Stepper: how the pipeline thread runs engine steps and hands their tokens to delivery.

Three ways, from :class:`~hf_paged.config.EngineConfig`:

* plain: ``deliver(step())``, one after the other (CPU default: the forward holds the cores);
* overlap: launch step N, deliver step N-1 while N runs on the device, then wait for N's tokens;
* async scheduling (CUDA default): launch step N+1 before step N's tokens reach the host, then record
  and deliver N while N+1 runs (see :meth:`Engine.launch`). Where a sequence sampling in N+1 needs its
  token of N on the host first (a grammar's mask, n-gram bans: :meth:`Engine.needs_tokens`), N+1's
  forward is launched, N is recorded while it runs, and then N+1's sampling is launched; N is delivered
  after. Only under tensor parallelism (:meth:`Engine.can_plan_ahead`) is N finished before N+1 is planned.

The pipeline calls :meth:`flush` before adds, cancels and calls and before it idles, so every token
launched so far is recorded and delivered first. ``park`` (CPU): called once a launched step's forward and
sampling are done, before the host work that follows (see :func:`~hf_paged.engine.host_runtime.park_openmp_workers`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .delivery import Delivery
from .engine import Engine, PendingStep, TokenRecord

logger = logging.getLogger(__name__)
# Nothing runs and the first waiting request does not fit: the pool's blocks are held outside the engine (a
# wrapped model's generate() on the same model, a kept PagedKVCache). The loop waits this long between tries
# instead of spinning a core.
STALL_S = 0.002


class Stepper:
    def __init__(self, engine: Engine, delivery: Delivery, *, overlap: bool, ahead: bool,
                 park: Callable[[], object] | None = None) -> None:
        self.engine = engine
        self.park = park or _nothing
        self.delivery = delivery
        self.overlap = overlap or ahead
        self.ahead = ahead
        self._records: list[TokenRecord] = []  # tokens recorded, not delivered yet (the last step's, overlapped)
        self._pending: PendingStep | None = None  # async: the launched step whose tokens are not recorded

    @property
    def holding(self) -> bool:
        """Tokens launched or recorded but not delivered yet."""
        return bool(self._records) or self._pending is not None

    def flush(self) -> None:
        """Record and deliver everything launched so far."""
        pending, records = self._pending, self._records
        self._pending, self._records = None, []
        if pending is not None:
            records += self.engine.complete(pending)
        if records:
            self.delivery.deliver(records)

    def fail(self, error: str, *, everyone: bool = True) -> None:
        """After a failed step: forget the step in flight and fail the requests it may have touched
        (:meth:`Delivery.fail_started`); ``everyone``: every request, when the engine stops, and also when no
        started request failed (the failure would come back at every step). Requests still waiting for their
        first step keep their place, as a batch's failure in TGI fails that batch only, and hold no blocks
        after it. Tokens recorded but not delivered are delivered first: they are in their sequences' token
        ids, so the outputs' texts and streams must have them too. The prefix cache is emptied: the failed
        step may have published blocks (at launch) whose K/V it never wrote."""
        records = self._records
        self._pending, self._records = None, []
        if records:
            try:
                self.delivery.deliver(records)
            except Exception:  # noqa: BLE001 - the requests are failed below all the same
                logger.exception("delivering the tokens before a failed step failed too")
        # A failure no started request explains (before the first waiting request was admitted) would come
        # back at every step: then every request fails.
        if everyone or not self.delivery.fail_started(error):
            self.delivery.fail_all(error)
        self.engine.scheduler.release_waiting()
        self.engine.scheduler.allocator.reset_prefix_cache()

    def step(self) -> None:
        """Run one step the configured way."""
        engine, delivery = self.engine, self.delivery
        if self.ahead:
            pending = self._pending
            if pending is not None and not engine.can_plan_ahead(pending):
                self._pending = None
                delivery.deliver(engine.complete(pending))
                pending = None
            fwd = engine.launch_forward(ahead=pending)
            early = None
            if pending is not None and fwd is not None and engine.needs_tokens(fwd):
                # Grammar masks or n-gram bans of this step read the tokens in flight: record them now, while
                # the device runs this step's forward (they come first in stream order), then sample.
                self._pending = None
                early = self._records = engine.complete(pending)  # held here until delivered (fail)
                pending = None
            self._pending = engine.launch_sample(fwd) if fwd is not None else None
            launched = fwd is not None
            self.park()
            if early is not None:
                self._records = []
                delivery.deliver(early)
            if pending is not None:
                delivery.deliver(engine.complete(pending))
        elif self.overlap:
            launched = engine.launch()
            self.park()
            records, self._records = self._records, []
            if records:
                # Host work while the device runs the step just launched. A stop string found here ends
                # its sequence; the token that sequence gets from the running step is dropped.
                delivery.deliver(records)
            if launched is not None:
                self._records = engine.complete(launched)
            launched = launched is not None
        else:
            steps = engine.steps
            records = engine.step()
            self.park()
            delivery.deliver(records)
            launched = engine.steps != steps
        # launched: whether this step scheduled anything
        if not launched and not self.holding and engine.scheduler.waiting and not engine.scheduler.running:
            time.sleep(STALL_S)


def _nothing() -> None:
    pass
