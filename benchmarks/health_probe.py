"""Probe a server's ``/health`` as an orchestrator's liveness check does, from a process of its own.

A new connection per probe, one probe every ``--interval`` seconds for ``--duration`` seconds, each
with a ``--timeout``. Run it beside a load (``serve_load.py``): the latencies are then the server's
own, not those of a load client's busy event loop. Prints one JSON object: percentiles, the worst
answer and the probes that failed or took longer than ``--timeout``.

    python benchmarks/health_probe.py --url http://127.0.0.1:8080 --duration 30 [--interval 0.25]
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time
import urllib.parse


def probe(url: str, timeout: float) -> float | None:
    """Seconds to a 200 from GET /health on a fresh connection; None when it failed or timed out."""
    parts = urllib.parse.urlsplit(url)
    start = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
    except OSError:
        return None
    finally:
        conn.close()
    return time.perf_counter() - start if ok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=0.25)
    ap.add_argument("--timeout", type=float, default=1.0, help="a probe slower than this counts as failed "
                    "(Kubernetes' default liveness timeout is 1 s)")
    args = ap.parse_args()
    times: list[float] = []
    failed = 0
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        t = probe(args.url, args.timeout)
        if t is None:
            failed += 1
        else:
            times.append(t)
        time.sleep(args.interval)
    ms = sorted(x * 1000 for x in times)

    def pct(p: float) -> float | None:
        return round(ms[min(len(ms) - 1, int(p * len(ms)))], 1) if ms else None

    print(json.dumps({"probes": len(ms) + failed, "failed_or_over_timeout": failed, "p50_ms": pct(0.5),
                      "p99_ms": pct(0.99), "worst_ms": round(ms[-1], 1) if ms else None,
                      "mean_ms": round(statistics.fmean(ms), 1) if ms else None}))


if __name__ == "__main__":
    main()
