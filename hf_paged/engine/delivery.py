"""Delivery: turns the engine's token records into text and events for the request handles.

It owns what the engine core does not know about: the :class:`Request` handles, one incremental
detokenizer per sequence, stop strings (a completed stop string ends the sequence through
:meth:`Engine.finish`) and the final :class:`RequestOutput`. It runs on the pipeline thread, right
after each step.

Example::

    delivery = Delivery(engine, tokenizer)
    delivery.add(request)
    delivery.deliver(engine.step())
"""
from __future__ import annotations

from dataclasses import dataclass

from .detokenizer import IncrementalDetokenizer
from .engine import Engine, TokenRecord
from .outputs import CompletionOutput, FinishReason, RequestOutput, StreamEvent
from .request import Request, Wakeups
from .sequence import Sequence, SeqStatus

_RAN = (SeqStatus.RUNNING, SeqStatus.FINISHED)


@dataclass(slots=True, eq=False)
class _Stream:
    """One sequence as delivery sees it."""

    request: Request
    seq: Sequence
    detok: IncrementalDetokenizer
    stop_string: str | None = None
    # Its last event was emitted (its final token delivered, or it was cancelled or failed). Siblings that
    # end in the same step end in one step's records: the request's output waits for all of them.
    ended: bool = False
    prompt_logprobs: bool = False  # continuation 0 of a request that asked for them, until its first event


class Delivery:
    def __init__(self, engine: Engine, tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.requests: dict[str, list[_Stream]] = {}  # request id -> its sequences, index order
        self._by_seq: dict[int, _Stream] = {}
        self._wakeups = Wakeups()

    def add(self, req: Request) -> None:
        """Start ``req``: its sequences go to the engine, their detokenizers stay here."""
        p = req.params
        seqs = self.engine.add(req.prompt_ids, p, req.grammar, req.adapter)
        try:
            streams = [_Stream(req, s, IncrementalDetokenizer(self.tokenizer, req.prompt_ids,
                                                              skip_special_tokens=p.skip_special_tokens, stop=p.stop))
                       for s in seqs]
        except BaseException:  # nobody would deliver its tokens: take its sequences (and blocks) back
            for s in seqs:
                self.engine.finish(s, FinishReason.ERROR)
            raise
        if p.prompt_logprobs is not None and streams:
            streams[0].prompt_logprobs = True
        self.requests[req.request_id] = streams
        for st in streams:
            self._by_seq[st.seq.seq_id] = st

    def deliver(self, records: list[TokenRecord]) -> None:
        """Text deltas and events of one step's tokens; ends sequences whose stop string completed."""
        wakeups = self._wakeups
        streams = self._by_seq
        try:
            for rec in records:
                st = streams.get(rec.seq_id)
                if st is None:
                    continue
                reason = rec.finish_reason
                req = st.request
                if reason is FinishReason.ERROR:  # no token: the engine failed this sequence (rec.error)
                    self.fail(req, rec.error, wakeups)  # after this step's events before it, also for asyncio
                    continue
                detok = st.detok
                delta = detok.push(rec.token)
                if detok.stopped is None and reason is None:  # the usual token: neither stop nor end
                    if req.quiet:  # nobody reads its token events (Request.quiet)
                        continue
                    ev = StreamEvent(req.request_id, st.seq.index, rec.token, delta, rec.logprob, rec.top_logprobs)
                    if st.prompt_logprobs:
                        self._with_prompt_logprobs(st, ev)
                    req.emit(ev, wakeups)
                    continue
                # The end releases held-back text first (bytes of an unfinished character): it may complete a
                # stop string, which then names the reason, as it would have a token later.
                delta += detok.flush()
                if detok.stopped is not None:
                    st.stop_string = detok.stopped
                    reason = FinishReason.STOP
                    self.engine.finish(st.seq, reason)
                st.ended = True
                ev = StreamEvent(req.request_id, st.seq.index, rec.token, delta, rec.logprob, rec.top_logprobs,
                                 reason, stop_string=st.stop_string)
                if st.prompt_logprobs:
                    self._with_prompt_logprobs(st, ev)
                req.emit(ev, wakeups)
                self._finish_request(req, wakeups)
        finally:
            wakeups.send()  # the asyncio consumers' events of this step: one wake-up per event loop

    def cancel(self, req: Request) -> None:
        """Stop all of the request's sequences now; its result keeps what was generated."""
        self._stop(req, FinishReason.CANCELLED)
        self._finish_request(req)

    def fail(self, req: Request, error: str, wakeups: Wakeups | None = None) -> None:
        self._stop(req, FinishReason.ERROR, wakeups)
        streams = self._forget(req)
        if not req.done:
            req.emit(StreamEvent(req.request_id, 0, None, "", error=error, output=self._output(req, streams, error)),
                     wakeups)

    def fail_all(self, error: str) -> None:
        for streams in list(self.requests.values()):
            self.fail(streams[0].request, error)

    def fail_started(self, error: str) -> int:
        """Fail the requests a failed step may have touched: those with an open sequence that is running, or
        finished with its last token not delivered, or has a token in flight (preempted while a step ahead
        ran). Requests whose open sequences all wait (never scheduled: the first waiting, its siblings forking
        from it; or preempted with nothing in flight) are left. Returns how many requests failed."""
        failed = 0
        for streams in list(self.requests.values()):
            open_ = [st for st in streams if not st.ended]
            if not open_ or any(st.seq.status in _RAN or st.seq.num_ahead for st in open_):
                self.fail(streams[0].request, error)
                failed += 1
        return failed

    def cancel_all(self) -> None:
        for streams in list(self.requests.values()):
            self.cancel(streams[0].request)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _with_prompt_logprobs(st: _Stream, ev: StreamEvent) -> None:
        """The first event of a request that asked for prompt logprobs carries them."""
        st.prompt_logprobs = False
        ev.prompt_logprobs = [None, *st.seq.prompt_logprobs]

    def _stop(self, req: Request, reason: FinishReason, wakeups: Wakeups | None = None) -> None:
        for st in self.requests.get(req.request_id, ()):
            if not st.seq.finished:
                self.engine.finish(st.seq, reason)
            if not st.ended:
                # Text held back (the start of a stop string, perhaps) was generated all the same: it is in the
                # output, so it is streamed too, in a last event of the sequence without a token.
                st.ended = True
                try:
                    tail = st.detok.flush()
                except Exception:  # noqa: BLE001 - the tokenizer failed on these tokens (fail() is why we are here)
                    tail = ""
                if tail:
                    req.emit(StreamEvent(req.request_id, st.seq.index, None, tail, finish_reason=st.seq.finish_reason),
                             wakeups)

    def _forget(self, req: Request) -> list[_Stream]:
        streams = self.requests.pop(req.request_id, [])
        for st in streams:
            self._by_seq.pop(st.seq.seq_id, None)
        return streams

    def _finish_request(self, req: Request, wakeups: Wakeups | None = None) -> None:
        streams = self.requests.get(req.request_id)
        if streams is not None and all(st.ended for st in streams):
            self._forget(req)
            req.emit(StreamEvent(req.request_id, 0, None, "", output=self._output(req, streams)), wakeups)

    @staticmethod
    def _output(req: Request, streams: list[_Stream], error: str | None = None) -> RequestOutput:
        p = req.params
        outs = []
        for st in streams:
            seq, ids = st.seq, st.seq.output_ids
            # A failed step can leave tokens recorded that never reached the text: the output has what was.
            n = st.detok.num_tokens if error is not None else len(ids)
            outs.append(CompletionOutput(seq.index, st.detok.text, ids[:n], seq.finish_reason,
                                         seq.logprobs[:n] if p.logprobs else None,
                                         seq.top_logprobs[:n] if p.top_logprobs else None,
                                         st.stop_string if seq.finish_reason is FinishReason.STOP else None))
        prompt_lps = None
        if p.prompt_logprobs is not None and streams:
            prompt_lps = [None, *streams[0].seq.prompt_logprobs]  # siblings share the first one's prompt
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, error, prompt_lps)
