"""The host sampler alone on CPU: ``Sampler.sample`` over a batch of next-token logits, per setting.

Real rows are the default model's raw next-token logits of sampled chat replies (set A prompts at
temperature 0.7, set B at 1.0; ``nucleus.real_logits``), saved to ``--cache`` on the first run so that
every run (and another checkout, through ``PYTHONPATH``) times the same rows. ``flat`` rows are Gaussian
scores of scale 0.05 over the same vocabulary: near-uniform, like a random test model's, where the nucleus
keeps most of the vocabulary and leaves many rows to HF's sort. malloc is tuned as the engine tunes it.

    python benchmarks/sampler_cpu.py [--rows 64] [--calls 7] [--cache /tmp/sampler_logits.pt] [--label NAME]

Prints one JSON line: the median ms of ``--calls`` calls for each setting. For an A/B, run it alternately
from two checkouts (``PYTHONPATH=<other checkout> python benchmarks/sampler_cpu.py --label base``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (name, rows, sampling settings): what OpenAI clients send (temperature, top_p), what TGI clients may add
# (typical_p), plain top-k, and top-k with top-p (generate()'s default top_k=50 under a top_p), also on
# bf16-rounded rows, where the top-p cut falls among equal scores more often.
SETTINGS = (("A T0.7 top_p0.9", "A", dict(temperature=0.7, top_p=0.9)),
            ("B T1.0 top_p0.95", "B", dict(temperature=1.0, top_p=0.95)),
            ("A T0.7 top_k50", "A", dict(temperature=0.7, top_k=50)),
            ("A T0.7 top_k50 top_p0.9", "A", dict(temperature=0.7, top_k=50, top_p=0.9)),
            ("A-bf16 T0.7 top_k50 top_p0.9", "A-bf16", dict(temperature=0.7, top_k=50, top_p=0.9)),
            ("B-bf16 T1.0 top_k50", "B-bf16", dict(temperature=1.0, top_k=50)),
            ("B T1.0 plain", "B", dict(temperature=1.0)),
            ("B T1.0 typical0.95", "B", dict(temperature=1.0, typical_p=0.95)),
            ("flat T1.0 top_p0.9", "flat", dict(temperature=1.0, top_p=0.9)),
            ("flat T1.0 typical0.9", "flat", dict(temperature=1.0, typical_p=0.9)))


def load_rows(cache: Path, rows: int) -> dict[str, torch.Tensor]:
    if cache.exists():
        data = torch.load(cache)
        if all(t.shape[0] >= rows for t in data.values()):
            return data
    from nucleus import chat_prompts, real_logits
    from transformers import AutoTokenizer

    from hf_paged.models import ensure_default_model, load_model

    path = str(ensure_default_model())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model, _ = load_model(path, dtype=torch.float32)
    out = {}
    for name, temperature, top_p in (("A", 0.7, 0.9), ("B", 1.0, 0.95)):
        steps = -(-rows // 16)
        out[name] = real_logits(model, tok, chat_prompts(tok, name, 16), steps, temperature, top_p)[:rows].contiguous()
    out["flat"] = torch.randn(rows, out["A"].shape[1], generator=torch.Generator().manual_seed(0)) * 0.05
    torch.save(out, cache)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--calls", type=int, default=7)
    ap.add_argument("--cache", default="/tmp/sampler_logits.pt")
    ap.add_argument("--label", default="this tree")
    args = ap.parse_args()

    from hf_paged.engine.host_runtime import tune_malloc
    from hf_paged.engine.params import SamplingParams
    from hf_paged.engine.sampler import Sampler, SamplingRow

    tune_malloc()
    data = load_rows(Path(args.cache), args.rows)
    result = {"label": args.label, "rows": args.rows, "threads": torch.get_num_threads(), "ms": {}}
    for name in ("A", "B"):  # a bf16 model's logits: many equal scores
        data[f"{name}-bf16"] = data[name].bfloat16().float()
    for name, which, settings in SETTINGS:
        logits = data[which][: args.rows]
        sampler = Sampler(logits.shape[1])
        params = SamplingParams.from_request(None, do_sample=True, seed=0, max_new_tokens=16,
                                             **(dict(top_k=0) | settings))
        ts = []
        for call in range(args.calls + 1):
            rows = [SamplingRow(params, [1], 1, torch.Generator().manual_seed(i), None) for i in range(len(logits))]
            t = time.perf_counter()
            sampler.sample(logits.clone(), rows)
            if call:  # the first call warms up (and builds the C++ kernels)
                ts.append(time.perf_counter() - t)
        result["ms"][name] = round(1e3 * statistics.median(ts), 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
