"""Delivery's per-token host work, in isolation, each way it can run:

* the detokenizer on the default model's tokenizer (byte-level BPE): its byte table (Python's incremental
  UTF-8 decoder) vs the decode window (two Rust decode calls a token, one of them memoised);
* handing a step's events to asyncio consumers: one ``call_soon_threadsafe`` per event vs one per event
  loop and step (``Wakeups``), timed on the engine's side while the loop thread consumes.

Interleaved rounds; every round, the median and the minimum are printed.

    python benchmarks/delivery_micro.py --rounds 5
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time


def detok_us_per_token(tok, texts: list[list[int]], table: bool) -> float:
    from hf_paged.engine import detokenizer as d

    real = d.ByteTable.of
    if not table:
        d.ByteTable.of = classmethod(lambda cls, t, skip: None)
    try:
        dets = [d.IncrementalDetokenizer(tok, [1, 2, 3]) for _ in texts]
        assert all((x._utf8 is not None) == table for x in dets)
        n = sum(len(t) for t in texts)
        t0 = time.perf_counter()
        for det, ids in zip(dets, texts):
            for t in ids:
                det.push(t)
        return 1e6 * (time.perf_counter() - t0) / n
    finally:
        d.ByteTable.of = real


def wake_ms_per_step(streams: int, steps: int, batched: bool) -> float:
    from hf_paged.engine.request import Wakeups

    async def main() -> float:
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in range(streams)]

        async def consume(q):
            while (await q.get()) is not None:
                pass

        tasks = [asyncio.create_task(consume(q)) for q in queues]

        def engine_thread() -> float:
            spent = 0.0
            w = Wakeups()
            for s in range(steps):
                t0 = time.perf_counter()
                for q in queues:
                    if batched:
                        w.add(loop, q, s)
                    else:
                        loop.call_soon_threadsafe(q.put_nowait, s)
                if batched:
                    w.send()
                spent += time.perf_counter() - t0
                time.sleep(0.005)  # the forward, during which the loop drains the queues
            for q in queues:
                loop.call_soon_threadsafe(q.put_nowait, None)
            return 1e3 * spent / steps

        out = await asyncio.to_thread(engine_thread)
        await asyncio.gather(*tasks)
        return out

    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", type=int, default=256)
    args = ap.parse_args()
    from hf_paged.models import _load_tokenizer, ensure_default_model

    tok = _load_tokenizer(ensure_default_model())
    sample = ("Once upon a time, in a lighthouse by the sea, there lived a keeper named Élise. "
              "Chaque nuit elle allumait la lampe 🙂 and wrote in her journal: 日本語も少し. ") * 4
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    texts = [ids[i % 7:] for i in range(args.streams)]
    rows: dict[str, list[float]] = {k: [] for k in ("detok byte table (us/token)", "detok window (us/token)",
                                                    f"wake per event (ms/step of {args.streams})",
                                                    f"wake per loop (ms/step of {args.streams})")}
    keys = list(rows)
    for r in range(args.rounds):
        rows[keys[0]].append(detok_us_per_token(tok, texts, True))
        rows[keys[1]].append(detok_us_per_token(tok, texts, False))
        rows[keys[2]].append(wake_ms_per_step(args.streams, 40, False))
        rows[keys[3]].append(wake_ms_per_step(args.streams, 40, True))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rows.items()), flush=True)
    for k, v in rows.items():
        print(f"{k}: median {statistics.median(v):.3f}, min {min(v):.3f}")


if __name__ == "__main__":
    main()
