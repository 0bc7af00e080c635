"""Offline throughput on one GPU: nano-vllm's benchmark workload, hf_paged vs transformers' own paths.

    python benchmarks/throughput_gpu.py [--out FILE] [--models llama-3.2-1b-shape,qwen3-0.6b-shape]
        [--systems hf_paged,hf_paged_eager,generate_batch,hf_static] [--budget-s 420]
    python benchmarks/throughput_gpu.py --cpu-dry-run --out /tmp/tg_dry.json    # plumbing check on CPU

Workload (nano-vllm's ``bench.py``, same calls in the same order): ``random.seed(0)``; 256 prompts, each
``randint(100, 1024)`` tokens long with ids ``randint(0, 10000)`` (inclusive bounds, as nano-vllm); then
one output length per request, ``randint(100, 1024)``, as that request's ``max_new_tokens``. EOS is
ignored (every request generates exactly its length), sampling with temperature 0.6. Nothing else is
set: top_k and top_p are the transformers defaults ``generate()`` applies (top_k=50, top_p=1.0; the
random-init models' generation_config sets neither). nano-vllm itself samples from the full
distribution (no top-k); top-k 50 costs one small sort per step here, which is not what is measured.
``generate_batch`` gets ``top_k=50`` written into its GenerationConfig, because its logits processors
take only what the config sets, so that all systems sample alike.

Models: random bf16 weights built on the GPU from configs (nothing downloaded), the shapes of
Llama-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256, tied
embeddings, default RoPE) and Qwen3-0.6B (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128,
intermediate 3072, vocab 151936, tied embeddings); no EOS token, pad 0. Each system gets a fresh model
(same seed, same weights), so a wrapped model never leaks into the next system.

Systems, on the same requests, each on both models before the next system (llama first), in the order
of what matters most if the budget runs out:
  hf_paged        PagedPipeline, CUDA graphs for decode (EngineConfig default enforce_eager=False) and
                  async scheduling (the CUDA default, set explicitly so the CPU dry run takes it too),
                  max_num_seqs 256, --max-batch-tokens, a KV budget of --kv-memory capped as generate_batch's
                  (max_num_seqs sequences of the longest length); per-request max_new_tokens (submit()).
  hf_paged_eager  the same with enforce_eager=True.
  generate_batch  transformers' continuous batching (the manager behind ``model.generate_batch``), used
                  directly so that each request keeps its own max_new_tokens (``generate_batch`` takes one
                  for all) and the warm-up happens outside the timed region: ContinuousBatchingConfig
                  with use_cuda_graph=True (--gb-cuda-graph), max_requests_per_batch 256, the same
                  max_batch_tokens, and num_blocks sized to the same KV byte budget as --kv-memory.
  hf_static       ``model.generate`` over padded batches of --static-batch requests in arrival order (left
                  padding), each batch generating its longest requested length; only each request's own
                  requested length counts as useful output.
Every system is warmed up first, untimed: a few prompts of mixed lengths, then a decode sweep
(--decode-seqs requests whose lengths 2, 3, ... make the running batch shrink one by one, so CUDA graphs /
Triton kernels of every decode batch size exist before the timed run); hf_static a short generate.

Metrics per (model, system):
  output_tok_s        useful output tokens / wall seconds of the full run (torch.cuda.synchronize around).
  decode_step_ms_256  a separate short run: --decode-seqs (256) requests of --decode-prompt (128) tokens,
                      --decode-output (64) new tokens each. hf_paged: the engine's step counter
                      (pipe.stats().steps) and tokens_generated are polled every ~5 ms; an interval is
                      decode-only when its token count is exactly 256 x its step count (all 256 sequences
                      sampled in each step); the value is the median over those intervals of seconds per
                      step. HF systems have no step counter: (T(1 + D new tokens) - T(1 new token)) / D
                      with D = --decode-output, i.e. decode time per step of the 256-row batch.
  roofline_fraction   (param_bytes + kv_bytes) / 4.8e12 B/s / step_seconds, with kv_bytes = sum over the
                      256 sequences of context_len x layers x 2 x kv_heads x head_dim x 2 bytes (bf16) at the
                      mean context of the measured window: the time the H200's HBM needs to read the
                      weights and the KV once, over the measured decode step time.
  peak_gib            torch.cuda.max_memory_allocated() after reset_peak_memory_stats() before the system's
                      model is built (so it includes the weights and the KV pool, the same budget for hf_paged
                      and generate_batch; hf_static's cache grows with its batches).
A system that fails records its error and the others still run. --budget-s (default 420) bounds the
whole run: a system that would start after it is recorded with error "skipped: time budget", and a run
still going at the deadline is stopped and recorded as cut, with the rate of what it generated until then
as "partial_tok_s" (it overstates a whole run, whose end has a thinner batch; hf_static's output_tok_s then
holds its finished batches' rate, with "partial": true). Every system but hf_paged may use at most its fair
share of the budget left. The JSON is rewritten after every system.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import random
import signal
import statistics
import sys
import time
import traceback

import torch

DEVICE = "cuda"
DTYPE = torch.bfloat16
HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e
MODELS = ("llama-3.2-1b-shape", "qwen3-0.6b-shape")
SYSTEMS = ("hf_paged", "hf_paged_eager", "generate_batch", "hf_static")  # the run order
ROOFLINE_FORMULA = ("roofline_fraction = (param_bytes + sum_seqs(context_len) * layers * 2 * kv_heads * head_dim"
                    " * dtype_bytes) / 4.8e12 B/s / decode_step_seconds")


class BudgetExceeded(Exception):
    """The time budget ran out while a system was running."""


# ---------------------------------------------------------------------------------------------- models
def model_config(name: str, tiny: bool):
    if name == "llama-3.2-1b-shape":
        from transformers import LlamaConfig

        size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=512) if tiny else
                dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256))
        return LlamaConfig(**size, tie_word_embeddings=True, max_position_embeddings=4096,
                           bos_token_id=1, eos_token_id=None, pad_token_id=0)
    if name == "qwen3-0.6b-shape":
        from transformers import Qwen3Config

        size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, intermediate_size=128, vocab_size=512) if tiny else
                dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                     head_dim=128, intermediate_size=3072, vocab_size=151936))
        return Qwen3Config(**size, tie_word_embeddings=True, max_position_embeddings=4096,
                           bos_token_id=None, eos_token_id=None, pad_token_id=0)
    raise ValueError(f"unknown model {name!r}; one of {MODELS}")


def build_model(name: str, tiny: bool):
    from transformers import AutoModelForCausalLM

    config = model_config(name, tiny)
    torch.manual_seed(0)
    with torch.device(DEVICE):  # initialise on the GPU: CPU init of 1B parameters is slow
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE)
    model.eval()
    model.generation_config.eos_token_id = None  # always generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * torch.empty((), dtype=DTYPE).element_size()


def make_tokenizer(vocab: int):
    """A word-level tokenizer over ``t0 .. t{vocab-1}``, built offline: PagedPipeline only detokenizes with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t0")


def roofline(model, seqs: int, mean_ctx: float, step_s: float) -> tuple[float, str]:
    p, kv = param_bytes(model), seqs * mean_ctx * kv_bytes_per_token(model)
    frac = (p + kv) / HBM_BYTES_PER_S / step_s
    return frac, (f"roofline: ({p / 1e9:.3f} GB params + {kv / 1e9:.3f} GB KV at {seqs} seqs x mean ctx "
                  f"{mean_ctx:.0f}) / 4.8e12 B/s = {(p + kv) / HBM_BYTES_PER_S * 1e3:.3f} ms vs {step_s * 1e3:.3f} ms")


# -------------------------------------------------------------------------------------------- workload
def nano_vllm_workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    """nano-vllm bench.py's requests: same random calls, same order (ids capped below ``vocab`` for tiny models)."""
    hi = min(10000, vocab - 1)
    random.seed(0)
    prompts = [[random.randint(0, hi) for _ in range(random.randint(args.min_prompt, args.max_prompt))]
               for _ in range(args.requests)]
    outputs = [random.randint(args.min_output, args.max_output) for _ in range(args.requests)]
    return prompts, outputs


def side_workloads(args, vocab: int) -> dict:
    """Warm-up and decode-measurement requests, from another random stream (no prefix shared with the run)."""
    rng = random.Random(1)
    hi = min(10000, vocab - 1)

    def ids(n: int) -> list[int]:
        return [rng.randint(0, hi) for _ in range(n)]

    mixed = [ids(min(n, args.max_prompt)) for n in (16, 300, 1000, 40)]
    sweep = [ids(16) for _ in range(args.decode_seqs)]
    decode = [ids(args.decode_prompt) for _ in range(args.decode_seqs)]
    decode_b = [ids(args.decode_prompt) for _ in range(args.decode_seqs)]  # a second set (no prefix-cache hits)
    decode_warm = [ids(args.decode_prompt) for _ in range(args.decode_seqs)]  # generate_batch's warm-up of them
    return {"mixed": (mixed, [4] * len(mixed)), "sweep": (sweep, [2 + i for i in range(len(sweep))]),
            "decode": decode, "decode_b": decode_b, "decode_warm": decode_warm}


def remaining(deadline: float) -> float:
    return deadline - time.monotonic()


# ---------------------------------------------------------------------------------------- hf_paged
def paged_wait(reqs, deadline: float, what: str) -> list:
    out = []
    try:
        for r in reqs:
            out.append(r.result(timeout=max(0.0, remaining(deadline))))
    except TimeoutError:
        for r in reqs:
            r.cancel()
        raise BudgetExceeded(f"time budget: {what} cut ({len(out)} of {len(reqs)} requests done)") from None
    return out


def paged_decode_step(pipe, prompts: list[list[int]], new: int, samp: dict,
                      deadline: float) -> tuple[float, float, str]:
    """Median seconds per engine step while all ``len(prompts)`` sequences decode, and their mean context."""
    n, length = len(prompts), len(prompts[0])
    s0 = pipe.stats()
    reqs = [pipe.submit(p, max_new_tokens=new, **samp) for p in prompts]
    snaps = [(time.perf_counter(), s0.steps, s0.tokens_generated)]
    while not all(r.done for r in reqs):
        if remaining(deadline) < 0:
            for r in reqs:
                r.cancel()
            raise BudgetExceeded("time budget: decode measurement cut")
        time.sleep(0.005)  # (a tighter poll takes the GIL from the engine thread: this run only)
        s = pipe.stats()
        if s.steps != snaps[-1][1]:
            snaps.append((time.perf_counter(), s.steps, s.tokens_generated))
    paged_wait(reqs, deadline, "decode measurement")
    per_step, window = [], []
    for (t0, st0, tk0), (t1, st1, tk1) in zip(snaps, snaps[1:]):
        if tk1 - tk0 == n * (st1 - st0):  # every step in between sampled all n sequences: decode only
            per_step.append((t1 - t0) / (st1 - st0))
            window.append((tk0 + tk1) / 2 - s0.tokens_generated)
    if not per_step:
        raise RuntimeError(f"no decode-only interval of {n} sequences seen ({len(snaps)} snapshots)")
    mean_ctx = length + statistics.fmean(window) / n
    note = (f"decode: {n} seqs x {length} prompt, {len(per_step)} decode-only intervals, median "
            f"{statistics.median(per_step) * 1e3:.3f} ms/step, mean {statistics.fmean(per_step) * 1e3:.3f}")
    return statistics.median(per_step), mean_ctx, note


def run_hf_paged(model, args, work, side, deadline, res, notes, eager: bool) -> None:
    from hf_paged import EngineConfig, PagedPipeline, unwrap

    # async_scheduling is the CUDA default; set here so that the CPU dry run takes the same loop. The KV budget
    # is generate_batch's (_kv_tokens), so that the systems' peak memory compares like for like.
    kv_memory = min(_bytes(args.kv_memory), _kv_tokens(args, work, side) * kv_bytes_per_token(model))
    config = EngineConfig(kv_memory=kv_memory, max_num_seqs=args.max_num_seqs,
                          max_batch_tokens=args.max_batch_tokens, enforce_eager=eager, async_scheduling=True)
    pipe = PagedPipeline(model, make_tokenizer(model.config.vocab_size), config=config)
    samp = dict(do_sample=True, temperature=args.temperature, ignore_eos=True)
    try:
        for key in ("mixed", "sweep"):  # warm-up: Triton compilation, CUDA graph capture
            prompts, outs = side[key]
            paged_wait([pipe.submit(p, max_new_tokens=n, **samp) for p, n in zip(prompts, outs)], deadline, "warm-up")
        torch.cuda.synchronize()
        step_s, ctx, note = paged_decode_step(pipe, side["decode"], args.decode_output, samp, deadline)
        res["decode_step_ms_256"] = step_s * 1e3
        res["roofline_fraction"], roof = roofline(model, len(side["decode"]), ctx, step_s)
        notes += [note, roof]
        prompts, outs = work
        before = pipe.stats()
        torch.manual_seed(0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        reqs = [pipe.submit(p, max_new_tokens=n, **samp) for p, n in zip(prompts, outs)]
        try:
            results = paged_wait(reqs, deadline, "timed run")
        except BudgetExceeded as exc:  # no output_tok_s: the rate so far, while the batch was full, overstates it
            seconds = time.perf_counter() - start
            rate = (pipe.stats().tokens_generated - before.tokens_generated) / seconds
            res["partial_tok_s"] = rate
            raise BudgetExceeded(f"{exc}; partial rate {rate:.1f} tok/s over the first {seconds:.1f} s (not the "
                                 "run's: the batch was still full)") from None
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        got = [len(r.outputs[0].token_ids) for r in results]
        useful = sum(min(g, n) for g, n in zip(got, outs))
        short = sum(g < n for g, n in zip(got, outs))
        res["output_tok_s"] = useful / seconds
        after = pipe.stats()
        notes.append(f"run: {len(reqs)} requests, {useful} output tokens in {seconds:.2f} s; "
                     f"{after.steps - before.steps} engine steps, {after.preemptions - before.preemptions} preemptions"
                     + (f"; {short} requests returned fewer tokens than asked" if short else ""))
        notes.append("hf_paged detokenizes every token as it streams (the baselines return token ids only)")
        notes.append(f"EngineConfig(enforce_eager={eager}, async_scheduling=True, max_num_seqs={args.max_num_seqs}, "
                     f"max_batch_tokens={args.max_batch_tokens}, kv_memory={args.kv_memory})")
    finally:
        graphs = pipe.engine.runner.graphs
        notes.append("decode graphs: " + ("none" if graphs is None else
                                          f"captured={graphs.captured}, {graphs.replays} replays, buckets "
                                          f"{graphs.buckets[0]}..{graphs.buckets[-1]}"))
        from hf_paged.engine import device_sampler

        notes.append(f"Triton sampling kernels (tied top-k draw, top-p threshold): "
                     f"{'on' if device_sampler.kernels_ok() else 'off (failed, see log)'}")
        if not eager and DEVICE == "cuda" and (graphs is None or not graphs.captured or not graphs.replays):
            res["error"] = "CUDA graphs were not captured or never replayed: these are eager figures (see the log)"
        pipe.close()
        unwrap(model)
        del pipe


# ---------------------------------------------------------------------------------- generate_batch
def cb_run(manager, prompts, outs, deadline: float, tag: str, done: dict | None = None) -> list[list[int]]:
    """Submit requests to transformers' continuous batching manager, each with its own max_new_tokens.
    ``done``: where the finished results go (request id -> output), also when the run is cut."""
    ids = [manager.add_request(p, request_id=f"{tag}-{i}", max_new_tokens=n)
           for i, (p, n) in enumerate(zip(prompts, outs))]
    done = {} if done is None else done
    while len(done) < len(ids):
        if remaining(deadline) < 0:
            raise BudgetExceeded(f"time budget: generate_batch {tag} cut ({len(done)} of {len(ids)} requests done)")
        r = manager.get_result(timeout=0.5)
        if r is None:
            if not manager.is_running():
                raise RuntimeError(f"continuous batching thread stopped ({len(done)} of {len(ids)} requests done)")
            continue
        if r.is_finished():
            done[r.request_id] = r
    errors = [f"{k}: {r.error}" for k, r in done.items() if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return [list(done[i].generated_tokens) for i in ids]


def run_generate_batch(model, args, work, side, deadline, res, notes) -> None:
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    prompts, outs = work
    gen = copy.deepcopy(model.generation_config)
    gen.do_sample, gen.temperature = True, args.temperature
    if gen.top_k is None:
        gen.top_k = 50  # generate()'s default, which hf_paged and hf_static apply; CB only applies what is set
    gen.max_new_tokens = max(outs)
    gen.eos_token_id = -1  # continuous batching's "no EOS"
    block_size = 256
    all_prompts = prompts + side["decode"] + side["mixed"][0] + side["sweep"][0]
    longest = max(map(len, all_prompts)) + max(outs + side["sweep"][1] + [args.decode_output + 1])
    # The KV byte budget of --kv-memory, but no more blocks than max_num_seqs sequences of the longest length
    # can hold (_kv_tokens): paged|sdpa's CUDA-graph warm-up attends over every block at once (time and mask
    # memory grow with num_blocks), and more blocks than that are never used by this workload.
    num_blocks = max(1, min(_bytes(args.kv_memory) // (block_size * kv_bytes_per_token(model)),
                            _kv_tokens(args, work, side) // block_size))
    hints = WorkloadHints(max_prompt_length=max(map(len, all_prompts)), max_generated_length=longest,
                          num_requests=len(prompts))
    graphs = {"on": True, "off": False, "auto": None}[args.gb_cuda_graph]
    attempts = [graphs] + ([False] if graphs is True else [])
    for k, use_graphs in enumerate(attempts):
        cb = ContinuousBatchingConfig(block_size=block_size, num_blocks=num_blocks,
                                      max_batch_tokens=args.max_batch_tokens,
                                      max_requests_per_batch=args.max_num_seqs, use_cuda_graph=use_graphs)
        kept = len(notes)
        try:
            info = cb_system(model, gen, cb, hints, args, work, side, deadline, res, notes)
            break
        except BudgetExceeded:
            raise
        except Exception as exc:  # noqa: BLE001 - CUDA graphs on paged|sdpa may not fit: try without
            if k + 1 == len(attempts):
                raise
            traceback.print_exc()
            del notes[kept:]
            res["decode_step_ms_256"] = res["roofline_fraction"] = None
            notes.append(f"use_cuda_graph={use_graphs} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                         f"rerun with use_cuda_graph={attempts[k + 1]}")
            gc.collect()
            torch.cuda.empty_cache()
    notes.append(f"transformers continuous batching manager (generate_batch's), per-request max_new_tokens, "
                 f"attn {info['attn']}, use_cuda_graph={use_graphs} requested"
                 + (f" / {info['graphs']} resolved" if info["graphs"] is not None else "")
                 + f", block_size {block_size}, num_blocks {num_blocks}, max_batch_tokens {args.max_batch_tokens}, "
                 f"max_requests_per_batch {args.max_num_seqs}, top_k 50")


def cb_system(model, gen, cb, hints, args, work, side, deadline, res, notes) -> dict:
    """One generate_batch measurement (warm-up, decode step, timed run) on a fresh manager."""
    prompts, outs = work
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                   block=True, timeout=30, warmup=True,
                                                   workload_hints=hints) as manager:
        info = {"attn": model.config._attn_implementation,
                "graphs": getattr(getattr(getattr(manager, "batch_processor", None), "cb_config", None),
                                  "use_cuda_graph", None)}
        try:
            for key in ("mixed", "sweep"):  # warm-up (graph capture of the sizes its own warmup() skipped)
                cb_run(manager, *side[key], deadline, f"warm-{key}")
            # and the decode measurement's own shapes (its graphs are keyed by the packed K/V length too), on
            # prompts of their own so that no timed request finds its prefix cached
            cb_run(manager, side["decode_warm"], [1 + args.decode_output] * len(side["decode_warm"]), deadline,
                   "warm-decode")
            torch.cuda.synchronize()
            times = []
            for key, new in (("decode", 1), ("decode_b", 1 + args.decode_output)):
                start = time.perf_counter()
                cb_run(manager, side[key], [new] * len(side[key]), deadline, key)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            step_s = (times[1] - times[0]) / args.decode_output
            n = len(side["decode"])
            if step_s > 0:
                res["decode_step_ms_256"] = step_s * 1e3
                res["roofline_fraction"], roof = roofline(model, n, args.decode_prompt + 1 + args.decode_output / 2,
                                                          step_s)
                notes.append(roof)
            notes.append(f"decode: (T(1+{args.decode_output}) - T(1)) / {args.decode_output} over {n} seqs x "
                         f"{args.decode_prompt} prompt = ({times[1]:.3f} - {times[0]:.3f}) s")
            torch.manual_seed(0)
            torch.cuda.synchronize()
            start = time.perf_counter()
            finished: dict = {}
            graphs_before = _cb_graphs(manager)
            try:
                outputs = cb_run(manager, prompts, outs, deadline, "run", finished)
            except BudgetExceeded:
                _cb_partial(manager, finished, outs, time.perf_counter() - start, res, notes)
                raise
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            graphs_after = _cb_graphs(manager)
            if graphs_before is not None and graphs_after is not None:
                # its graphs are keyed by the packed K/V length too: longer contexts than the warm-up's are
                # captured inside the timed run (two forwards each)
                notes.append(f"CUDA graphs: {graphs_before} before the timed run, {graphs_after} after")
        except BaseException:
            try:  # do not let the context manager flush what is still queued
                manager.stop(block=True, timeout=30, hard_stop=True)
            except Exception:  # noqa: BLE001 - best effort, the original error matters
                pass
            raise
    got = [len(o) for o in outputs]
    useful = sum(min(g, n) for g, n in zip(got, outs))
    short = sum(g < n for g, n in zip(got, outs))
    res["output_tok_s"] = useful / seconds
    notes.append(f"run: {len(prompts)} requests, {useful} output tokens in {seconds:.2f} s"
                 + (f"; {short} requests returned fewer tokens than asked" if short else ""))
    return info


def _cb_graphs(manager) -> int | None:
    """How many CUDA graphs transformers' continuous batching holds (None where its layout is unknown)."""
    try:
        io = manager.batch_processor.inputs_and_outputs
        holders = list(getattr(io, "io_pairs", None) or [io])
        counts = [len(h.graphs._storage) for h in holders if hasattr(getattr(h, "graphs", None), "_storage")]
        return sum(counts) if counts else None
    except Exception:  # noqa: BLE001 - a note only
        return None


def _cb_partial(manager, finished: dict, outs: list[int], seconds: float, res: dict, notes: list[str]) -> None:
    """A cut generate_batch run: the rate of the tokens generated until the cut. A hard stop fails every
    unfinished request and hands it back with the tokens it has (transformers' _fail_all_remaining_requests)."""
    try:
        manager.stop(block=True, timeout=20, hard_stop=True)
        while (r := manager.get_result(timeout=0.5)) is not None:
            if str(r.request_id).startswith("run-"):
                finished.setdefault(r.request_id, r)
    except Exception as exc:  # noqa: BLE001 - count what was read
        notes.append(f"partial outputs not all read back ({type(exc).__name__}: {exc})")
    useful = sum(min(len(r.generated_tokens), outs[int(str(k).split("-")[1])]) for k, r in finished.items())
    done = sum(r.error is None for r in finished.values())
    notes.append(f"partial: cut after {seconds:.2f} s, {done} of {len(outs)} requests finished, {useful} useful tokens "
                 "(finished ones and those handed back by the hard stop)")
    if useful:  # no output_tok_s: as hf_paged's partial rate, the batch was still full
        res["partial_tok_s"] = useful / seconds


def _kv_tokens(args, work, side, block_size: int = 256) -> int:
    """KV tokens enough for max_num_seqs sequences of the workload's longest length, in whole blocks of 256 plus
    one: the budget of both engines (hf_paged's --kv-memory and generate_batch's num_blocks are capped to it)."""
    prompts, outs = work
    all_prompts = prompts + side["decode"] + side["mixed"][0] + side["sweep"][0]
    longest = max(map(len, all_prompts)) + max(outs + side["sweep"][1] + [args.decode_output + 1])
    return args.max_num_seqs * (-(-longest // block_size) + 1) * block_size


def _bytes(value: str) -> int:
    from hf_paged.kv.pool import parse_bytes

    return int(parse_bytes(value))


# --------------------------------------------------------------------------------------- hf_static
def hf_generate(model, prompts, new: int, temperature: float, max_time: float | None = None):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=True,
                         temperature=temperature, pad_token_id=0, max_time=max_time)
    return out[:, width:]


def run_hf_static(model, args, work, side, deadline, res, notes) -> None:
    prompts, outs = work
    with torch.inference_mode():
        hf_generate(model, side["mixed"][0][:2], 4, args.temperature)  # warm-up
        torch.cuda.synchronize()
        times = []
        for key, new in (("decode", 1), ("decode", 1 + args.decode_output)):
            start = time.perf_counter()
            hf_generate(model, side[key], new, args.temperature)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        step_s = (times[1] - times[0]) / args.decode_output
        n = len(side["decode"])
        if step_s > 0:
            res["decode_step_ms_256"] = step_s * 1e3
            res["roofline_fraction"], roof = roofline(model, n, args.decode_prompt + 1 + args.decode_output / 2, step_s)
            notes.append(roof)
        notes.append(f"decode: (T(1+{args.decode_output}) - T(1)) / {args.decode_output} over {n} rows x "
                     f"{args.decode_prompt} prompt = ({times[1]:.3f} - {times[0]:.3f}) s")
        torch.manual_seed(0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        batches = range(0, len(prompts), args.static_batch)
        useful = generated = 0
        whole = (0, 0.0)  # useful tokens and seconds of the batches that finished
        for k, i in enumerate(batches):
            if remaining(deadline) < 0:
                seconds = time.perf_counter() - start
                notes.append(f"partial: {k} of {len(batches)} batches, {useful} useful tokens in {seconds:.2f} s "
                             f"= {useful / seconds:.1f} tok/s")
                if useful:  # the rate of the batches that finished (arrival order: a fair sample of the workload)
                    res["output_tok_s"], res["partial"] = useful / seconds, True
                raise BudgetExceeded(f"time budget: stopped after {k} of {len(batches)} batches "
                                     "(output_tok_s: those batches' rate)")
            chunk, lens = prompts[i:i + args.static_batch], outs[i:i + args.static_batch]
            # max_time: a batch takes tens of seconds; one the deadline cuts counts what it made by then
            out = hf_generate(model, chunk, max(lens), args.temperature, max_time=max(remaining(deadline), 1.0))
            useful += sum(min(n, out.shape[1]) for n in lens)
            generated += out.numel()
            if out.shape[1] < max(lens):
                if remaining(deadline) > 0:
                    raise RuntimeError(f"generate stopped early: {out.shape[1]} of {max(lens)} tokens")
                # Cut inside a batch (max_time): its rows were all still running, so the rate until now
                # overstates the run's; output_tok_s keeps the finished batches' rate, if any.
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                res["partial_tok_s"] = useful / seconds
                if whole[0]:
                    res["output_tok_s"], res["partial"] = whole[0] / whole[1], True
                notes.append(f"partial: batch {k + 1} of {len(batches)} cut at {out.shape[1]} of {max(lens)} tokens; "
                             f"{useful} useful tokens in {seconds:.2f} s; {k} whole batches: {whole[0]} in "
                             f"{whole[1]:.2f} s")
                raise BudgetExceeded(f"time budget: cut in batch {k + 1} of {len(batches)}")
            torch.cuda.synchronize()
            whole = (useful, time.perf_counter() - start)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    res["output_tok_s"] = useful / seconds
    notes.append(f"run: {len(prompts)} requests in {len(batches)} batches of {args.static_batch} (left padding, "
                 f"arrival order, each to its longest output): {useful} useful of {generated} generated tokens "
                 f"in {seconds:.2f} s; attn {model.config._attn_implementation}")


# ------------------------------------------------------------------------------------------- driver
def run_one(model_name: str, system: str, args, work, side, deadline: float, left: int) -> dict:
    """Run one system on a fresh model. Every system but hf_paged (the first) may use at most its fair share
    of what is left of the budget (left / systems still to run, this one included), so that a slow one
    cannot starve the systems after it; hf_paged is bounded by the whole budget only."""
    res = {"model": model_name, "system": system, "output_tok_s": None, "decode_step_ms_256": None,
           "peak_gib": None, "roofline_fraction": None, "error": None, "notes": ""}
    if remaining(deadline) < (args.min_start_paged_s if system.startswith("hf_paged") else args.min_start_s):
        res["error"] = "skipped: time budget"
        return res
    notes: list[str] = []
    model = None
    start = time.monotonic()
    if system != "hf_paged" and left > 1:
        deadline = min(deadline, start + max(remaining(deadline) / left, args.min_start_s))
        notes.append(f"time cap {remaining(deadline):.0f} s (fair share of the budget left)")
    print(f"--- {model_name} / {system} (may run {remaining(deadline):.0f} s)", flush=True)
    try:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = build_model(model_name, args.cpu_dry_run)
        if system == "hf_paged":
            run_hf_paged(model, args, work, side, deadline, res, notes, eager=False)
        elif system == "hf_paged_eager":
            run_hf_paged(model, args, work, side, deadline, res, notes, eager=True)
        elif system == "generate_batch":
            run_generate_batch(model, args, work, side, deadline, res, notes)
        elif system == "hf_static":
            run_hf_static(model, args, work, side, deadline, res, notes)
        else:
            raise ValueError(f"unknown system {system!r}")
    except BudgetExceeded as exc:
        res["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - one system failing must not hide the others
        traceback.print_exc()
        res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        try:
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception:  # noqa: BLE001
            pass
        del model
        gc.collect()
        try:
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - a sticky CUDA error: record this system, the next ones fail fast
            notes.append(f"cleanup failed: {type(exc).__name__}: {str(exc)[:200]}")
    notes.append(f"system wall {time.monotonic() - start:.1f} s incl. model build and warm-up")
    res["notes"] = "; ".join(notes)
    print(f"    output {_fmt(res['output_tok_s'], '.1f')} tok/s, decode {_fmt(res['decode_step_ms_256'], '.3f')} "
          f"ms/step, roofline {_fmt(res['roofline_fraction'], '.3f')}, peak {_fmt(res['peak_gib'], '.2f')} GiB"
          + (f", error: {res['error']}" if res["error"] else ""), flush=True)
    return res


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    rows = ["| model | system | output tok/s | decode ms/step @256 | roofline | peak GiB | error |",
            "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        rate = _fmt(r['output_tok_s'], '.1f') + (" (finished part)" if r.get("partial") else "")
        if r.get("partial_tok_s") is not None:
            rate += f" (cut: {r['partial_tok_s']:.1f} until then)"
        rows.append(f"| {r['model']} | {r['system']} | {rate} | "
                    f"{_fmt(r['decode_step_ms_256'], '.3f')} | {_fmt(r['roofline_fraction'], '.3f')} | "
                    f"{_fmt(r['peak_gib'], '.2f')} | {(r['error'] or '')[:120]} |")
    return "\n".join(rows)


def write_json(path: str, device: str, date: str, results: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"device": device, "date": date, "results": results}, f, indent=2)
    os.replace(tmp, path)  # a kill mid-write leaves the previous complete file


def _names(value: str, allowed: tuple[str, ...]) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{bad or value!r}: choose from {', '.join(allowed)}")
    return [n for n in allowed if n in names]  # the fixed run order


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON results (default benchmarks/results/gpu_throughput_<date>.json)")
    ap.add_argument("--models", type=lambda v: _names(v, MODELS), default=list(MODELS))
    ap.add_argument("--systems", type=lambda v: _names(v, SYSTEMS), default=list(SYSTEMS))
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--min-prompt", type=int, default=100)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--min-output", type=int, default=100)
    ap.add_argument("--max-output", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--kv-memory", default=None, help="KV budget of hf_paged (and generate_batch's num_blocks); "
                    "default 40GiB (64MiB in the dry run)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--static-batch", type=int, default=64, help="hf_static batch size")
    ap.add_argument("--gb-cuda-graph", choices=("on", "off", "auto"), default="on",
                    help="generate_batch's ContinuousBatchingConfig.use_cuda_graph (auto: transformers decides)")
    ap.add_argument("--decode-seqs", type=int, default=256, help="sequences of the decode-step measurement")
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-output", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    ap.add_argument("--min-start-s", type=float, default=10.0,
                    help="a system does not start with less budget than this left")
    ap.add_argument("--min-start-paged-s", type=float, default=30.0,
                    help="the same for hf_paged systems (pool, graph capture, warm-up and decode measurement first)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="tiny fp32 models on CPU, 8 short requests: checks every code path, not performance")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"gpu_throughput_{date}.json")

    global DEVICE, DTYPE
    if args.cpu_dry_run:
        DEVICE, DTYPE = "cpu", torch.float32
        for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
            setattr(torch.cuda, name, lambda *a, **k: None)
        torch.cuda.max_memory_allocated = lambda *a, **k: 0
        torch.cuda.get_device_name = lambda *a, **k: "cpu (dry run)"
        args.requests = min(args.requests, 8)
        args.min_prompt, args.max_prompt = min(args.min_prompt, 4), min(args.max_prompt, 32)
        args.min_output, args.max_output = min(args.min_output, 4), min(args.max_output, 16)
        args.decode_seqs, args.decode_prompt, args.decode_output = min(args.decode_seqs, 8), 8, 8
        args.static_batch = min(args.static_batch, 4)
        args.max_num_seqs = min(args.max_num_seqs, 16)
        args.max_batch_tokens = min(args.max_batch_tokens, 256)
        args.kv_memory = args.kv_memory or "64MiB"
        args.min_start_s = min(args.min_start_s, 1.0)
        args.min_start_paged_s = min(args.min_start_paged_s, 1.0)
    elif not torch.cuda.is_available():
        msg = "CUDA is not available: the throughput GPU benchmark needs a GPU (try --cpu-dry-run); skipped."
        print(msg)
        write_json(out, "none", date, [])
        return 0
    args.kv_memory = args.kv_memory or "40GiB"
    deadline = t_start + args.budget_s

    import transformers

    device = torch.cuda.get_device_name()
    print(f"{device}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"dtype {str(DTYPE).replace('torch.', '')}; budget {args.budget_s:.0f} s", flush=True)
    print(ROOFLINE_FORMULA, flush=True)
    vocab_cap = min(model_config(m, args.cpu_dry_run).vocab_size for m in args.models)
    work = nano_vllm_workload(args, vocab_cap)
    side = side_workloads(args, vocab_cap)
    print(f"workload: {len(work[0])} requests, prompt tokens {sum(map(len, work[0]))} "
          f"({args.min_prompt}..{args.max_prompt}), output tokens {sum(work[1])} ({args.min_output}.."
          f"{args.max_output}), temperature {args.temperature}, EOS ignored", flush=True)
    results: list[dict] = []
    runs = [(m, s) for s in args.systems for m in args.models]

    def killed(signum, frame):  # the stage's time limit (SIGTERM): record what is done, end the run in progress
        stop.append(signum)
        write_json(out, device, date, results + [{"model": current[0], "system": current[1], "output_tok_s": None,
                                                 "decode_step_ms_256": None, "peak_gib": None,
                                                 "roofline_fraction": None, "error": "killed (SIGTERM)",
                                                 "notes": ""}] if current else results)
        raise BudgetExceeded(f"killed by signal {signum}")

    current: tuple[str, str] | None = None
    stop: list[int] = []
    signal.signal(signal.SIGTERM, killed)
    for k, (model_name, system) in enumerate(runs):
        current = (model_name, system)
        try:
            results.append(run_one(model_name, system, args, work, side, deadline, len(runs) - k))
        except BudgetExceeded:  # the signal arrived outside a system's own handler: what is written stays
            return 1
        current = None
        write_json(out, device, date, results)
        if stop:
            print(f"stopped by signal {stop[0]}", flush=True)
            return 1
    print()
    print(table(results))
    print(f"\nwritten {out} ({time.monotonic() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
