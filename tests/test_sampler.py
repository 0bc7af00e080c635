"""Sampler: the same processed scores and greedy tokens as transformers' generate(), per row, in any batch."""
from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_paged.engine.params import SamplingParams
from hf_paged.engine.sampler import Sampler, SamplingRow

V = 256
EOS = 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=EOS, pad_token_id=0, initializer_range=0.3)
    m = tf.LlamaForCausalLM(cfg).eval()
    m.generation_config.pad_token_id = 0
    return m


def hf_processors(model, prompt_len: int, **gen):
    """The LogitsProcessorList generate() builds for these kwargs (same calls, same order)."""
    gc, _ = model._prepare_generation_config(None, **gen)
    model._prepare_special_tokens(gc, device="cpu")
    gc = model._prepare_generated_length(gc, has_default_max_length=False, has_default_min_length=True,
                                         model_input_name="input_ids", input_ids_length=prompt_len,
                                         inputs_tensor=None)
    mask = torch.ones(1, prompt_len, dtype=torch.long)
    return model._get_logits_processor(gc, input_ids_seq_length=prompt_len, device="cpu",
                                       model_kwargs={"attention_mask": mask})


def params(**kw) -> SamplingParams:
    kw.setdefault("max_new_tokens", 64)
    kw.setdefault("eos_token_id", [EOS])
    return SamplingParams(**kw)


def assert_same_scores(ours: torch.Tensor, ref: torch.Tensor, msg: str = "") -> None:
    """Equal -inf masks and close finite values."""
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), f"different removed tokens {msg}"
    fin = torch.isfinite(ref)
    torch.testing.assert_close(ours[fin], ref[fin], rtol=1e-5, atol=1e-5, msg=msg)


GEN_OPTIONS = st.fixed_dictionaries({}, optional={
    "repetition_penalty": st.sampled_from([0.7, 1.3, 2.0]),
    "no_repeat_ngram_size": st.integers(1, 3),
    "min_new_tokens": st.integers(1, 6),
    "temperature": st.sampled_from([0.3, 0.7, 1.5]),
    "top_k": st.sampled_from([0, 1, 5, 40]),
    "top_p": st.sampled_from([0.3, 0.9]),
    "min_p": st.sampled_from([0.05, 0.2]),
    "typical_p": st.sampled_from([0.5, 0.95]),
})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(options=st.lists(st.tuples(GEN_OPTIONS, st.booleans(), st.integers(1, 12), st.integers(0, 8)),
                        min_size=1, max_size=5),
       seed=st.integers(0, 2**16))
def test_processed_scores_equal_generates_processors(model, options, seed):
    """A batch of rows with mixed options: each row's scores equal generate()'s processors on that row alone."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(options), V, generator=g) * 3
    rows, refs = [], []
    for i, (gen, do_sample, prompt_len, num_gen) in enumerate(options):
        # A small alphabet makes repeats, n-gram bans and EOS in the history likely.
        ids = torch.randint(0, 12, (prompt_len + num_gen,), generator=g).tolist()
        rows.append(SamplingRow(params(do_sample=do_sample, **gen), ids, num_gen, None))
        procs = hf_processors(model, prompt_len, do_sample=do_sample, **gen)
        refs.append(procs(torch.tensor([ids]), logits[i : i + 1].clone())[0])
    ours = Sampler(V).process(logits, rows)
    for i, ref in enumerate(refs):
        assert_same_scores(ours[i], ref, msg=f"row {i}: {options[i]}")


def test_greedy_tokens_equal_generate(model):
    """Step by step on generate()'s own raw logits: same tokens and same processed scores, in a mixed batch."""
    prompts = [[1, 5, 9, 5, 9, 7], [1, 30, 31, 32], [1, 200, 100, 200, 100, 200, 100, 3]]
    gen = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5)
    runs = []
    for p in prompts:
        first = model(torch.tensor([p])).logits[0, -1].argmax().item()
        # EOS = the token greedy would pick first, so min_new_tokens really has to suppress it.
        out = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12, eos_token_id=first,
                             return_dict_in_generate=True, output_scores=True, output_logits=True, **gen)
        runs.append((p, first, out))
    sampler = Sampler(V)
    ids = [list(p) for p in prompts]
    noise = torch.Generator().manual_seed(1)
    for step in range(12):
        live = [k for k, (p, _, out) in enumerate(runs) if step < len(out.logits)]
        if not live:
            break
        rows = [SamplingRow(params(eos_token_id=[runs[k][1]], **gen), ids[k], step, None) for k in live]
        logits = [runs[k][2].logits[step][0] for k in live]
        # Unrelated rows in the same batch (fast greedy and sampling) must not change anything.
        rows += [SamplingRow(params(), [1, 2, 3], 0, None),
                 SamplingRow(params(do_sample=True, top_k=5), [4, 4], 1, torch.Generator().manual_seed(step))]
        logits += [torch.randn(V, generator=noise), torch.randn(V, generator=noise)]
        batch = torch.stack(logits)
        toks = sampler.sample(batch, rows).tokens
        processed = sampler.process(batch, rows)
        for j, k in enumerate(live):
            p, _, out = runs[k]
            want = out.sequences[0, len(p) + step].item()
            assert toks[j] == want, f"prompt {k} step {step}"
            assert_same_scores(processed[j], out.scores[step][0], msg=f"prompt {k} step {step}")
            ids[k] = ids[k] + [toks[j]]
    for k, (p, _, out) in enumerate(runs):
        assert ids[k] == out.sequences[0].tolist()


@pytest.mark.parametrize("gen", [
    dict(temperature=0.7, top_k=20, top_p=0.9),
    dict(top_k=0, top_p=0.8),
    dict(top_k=0, temperature=1.3, min_p=0.1),
    dict(top_k=30, typical_p=0.7),
    dict(repetition_penalty=1.2, no_repeat_ngram_size=3, temperature=0.8, top_k=10, min_new_tokens=4),
])
def test_sampling_distribution_equals_generate(model, gen):
    """generate() samples from its global RNG; compare the distribution it samples from instead."""
    prompt = [1, 17, 42, 17, 42, 99]
    torch.manual_seed(3)
    out = model.generate(torch.tensor([prompt]), do_sample=True, max_new_tokens=10, eos_token_id=EOS,
                         return_dict_in_generate=True, output_scores=True, output_logits=True, **gen)
    seq = out.sequences[0].tolist()
    sampler = Sampler(V)
    for step, (raw, scores) in enumerate(zip(out.logits, out.scores)):
        row = SamplingRow(params(do_sample=True, **gen), seq[: len(prompt) + step], step, None)
        assert_same_scores(sampler.process(raw, [row])[0], scores[0], msg=f"step {step}")
        # The token generate() drew is one our distribution allows.
        assert math.isfinite(sampler.process(raw, [row])[0, seq[len(prompt) + step]].item())


def test_seeded_row_same_alone_or_in_any_batch():
    p = params(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    others = [params(), params(do_sample=True, temperature=0.9, top_k=40, top_p=0.95),
              params(do_sample=True, top_k=0), params(do_sample=True, repetition_penalty=1.5, top_k=3)]
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(6, V, generator=g) for _ in range(8)]
    sampler = Sampler(V)

    def run(batch_of: list[SamplingParams], position: int) -> list[int]:
        gens = [torch.Generator().manual_seed(11) if k == position else torch.Generator().manual_seed(100 + k)
                for k in range(len(batch_of))]
        got = []
        for logits in steps:
            batch = logits[: len(batch_of)].clone()
            batch[position] = logits[5]
            rows = [SamplingRow(q, [1, 2, 3] + got, len(got), gens[k]) for k, q in enumerate(batch_of)]
            got.append(sampler.sample(batch, rows).tokens[position])
        return got

    alone = run([p], 0)
    assert run(others[:2] + [p] + others[2:], 2) == alone
    assert run([p] + others, 0) == alone
    assert run(others + [p], len(others)) == alone


def test_sampling_frequencies_follow_softmax():
    """The inverse-CDF draw samples softmax(scores): 4000 seeded rows, one logits row repeated."""
    base = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0] + [-float("inf")] * (V - 5))
    n = 4000
    rows = [SamplingRow(params(do_sample=True, top_k=0), [1], 0, torch.Generator().manual_seed(s)) for s in range(n)]
    toks = Sampler(V).sample(base.expand(n, V), rows).tokens
    probs = torch.softmax(base, -1)
    counts = torch.bincount(torch.tensor(toks), minlength=V).double() / n
    assert counts[5:].sum() == 0
    for t in range(4):
        sd = math.sqrt(probs[t] * (1 - probs[t]) / n)
        assert abs(counts[t] - probs[t]) < 5 * sd + 1e-3, (t, counts[t], probs[t])


def test_greedy_fast_path_equals_per_row_path():
    g = torch.Generator().manual_seed(5)
    logits = torch.randint(-3, 3, (64, V), generator=g).float()  # many ties: lowest index must win
    rows = [SamplingRow(params(), [1, 2], 0, None) for _ in range(64)]
    sampler = Sampler(V)
    fast = sampler.sample(logits, rows).tokens
    assert fast == torch.argmax(logits, dim=-1).tolist()
    assert fast == [sampler.sample(logits[i : i + 1], rows[i : i + 1]).tokens[0] for i in range(64)]
    # Rows that take the processing path (an inactive-looking penalty of 1.0 plus min_new_tokens done).
    slow_rows = [SamplingRow(params(repetition_penalty=1.0 + 1e-9), [250], 0, None) for _ in range(64)]
    assert sampler.sample(logits, slow_rows).tokens == fast
    # A mix: every other row fast.
    mixed = [rows[i] if i % 2 else slow_rows[i] for i in range(64)]
    assert sampler.sample(logits, mixed).tokens == fast


def test_topk_tie_at_border_keeps_all_tied_tokens(model):
    logits = torch.zeros(1, V)
    logits[0, :3] = torch.tensor([5.0, 4.0, 4.0])  # k=2: both 4.0 survive in HF
    row = SamplingRow(params(do_sample=True, top_k=2, temperature=0.5), [1], 0, None)
    ours = Sampler(V).process(logits, [row])[0]
    ref = hf_processors(model, 1, do_sample=True, top_k=2, temperature=0.5)(torch.tensor([[1]]), logits.clone())[0]
    assert_same_scores(ours, ref)
    assert torch.isfinite(ours).sum() == 3


def test_frequency_and_presence_penalty():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(2))
    prompt, gen = [7, 7, 8], [9, 9, 9, 7, 10]
    row = SamplingRow(params(frequency_penalty=0.5, presence_penalty=1.5), prompt + gen, len(gen), None)
    ours = Sampler(V).process(logits, [row])[0]
    want = logits[0].clone()
    for t, c in {9: 3, 7: 1, 10: 1}.items():
        want[t] -= 0.5 * c + 1.5
    torch.testing.assert_close(ours, want)  # prompt-only token 8 is untouched


def test_repetition_penalty_then_frequency_penalty_order():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    row = SamplingRow(SamplingParams(max_new_tokens=4, repetition_penalty=2.0, frequency_penalty=1.0),
                      [0, 1, 0], 2, None)
    ours = Sampler(4).process(logits, [row])[0]
    # HF penalty first (2/2=1, -2*2=-4), then OpenAI's over generated [1, 0]: -1 each.
    torch.testing.assert_close(ours, torch.tensor([0.0, -5.0, 1.0, 0.5]))


def test_min_new_tokens_bans_every_eos_until_reached():
    logits = torch.zeros(1, 8)
    logits[0, 3] = 10
    p = SamplingParams(max_new_tokens=9, min_new_tokens=2, eos_token_id=[3, 5])
    s = Sampler(8)
    assert s.sample(logits, [SamplingRow(p, [1, 1], 1, None)]).tokens != [3]
    assert s.process(logits, [SamplingRow(p, [1, 1], 1, None)])[0, [3, 5]].eq(-float("inf")).all()
    assert s.sample(logits, [SamplingRow(p, [1, 1, 1], 2, None)]).tokens == [3]
    # ignore_eos is the stopping rule's business: it does not change the scores.
    q = SamplingParams(max_new_tokens=9, eos_token_id=[3], ignore_eos=True)
    assert s.sample(logits, [SamplingRow(q, [1], 0, None)]).tokens == [3]


def test_logprobs_under_processed_distribution():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, V, generator=g) * 2
    rows = [SamplingRow(params(logprobs=True, top_logprobs=3), [1], 0, None),
            SamplingRow(params(do_sample=True, top_k=4, logprobs=True, top_logprobs=6), [1], 0,
                        torch.Generator().manual_seed(0)),
            SamplingRow(params(), [1], 0, None)]
    sampler = Sampler(V)
    out = sampler.sample(logits, rows)
    logp = torch.log_softmax(sampler.process(logits, rows), dim=-1)
    for i in (0, 1):
        assert out.logprobs[i] == pytest.approx(logp[i, out.tokens[i]].item(), abs=1e-5)
    assert out.logprobs[2] is None and out.top_logprobs[2] == []
    top0 = torch.topk(logp[0], 3)
    assert [t for t, _ in out.top_logprobs[0]] == top0.indices.tolist()
    assert [v for _, v in out.top_logprobs[0]] == pytest.approx(top0.values.tolist(), abs=1e-5)
    # top_k=4 leaves 4 finite tokens: the removed ones are not listed.
    assert len(out.top_logprobs[1]) == 4
    assert sum(math.exp(v) for _, v in out.top_logprobs[1]) == pytest.approx(1.0, abs=1e-5)
    assert sampler.sample(logits, [rows[2]] * 3).logprobs is None


def test_logits_wider_than_vocab_are_cut():
    logits = torch.zeros(2, 300)
    logits[:, 280] = 100.0  # a padded lm_head column that has no token
    logits[:, 7] = 1.0
    rows = [SamplingRow(params(), [1], 0, None), SamplingRow(params(do_sample=True, top_k=0), [1], 0, None)]
    out = Sampler(V).sample(logits, rows)
    assert out.tokens[0] == 7 and out.tokens[1] < V


def test_bad_logits_shape():
    with pytest.raises(ValueError, match="logits"):
        Sampler(V).sample(torch.zeros(3, V), [SamplingRow(params(), [1], 0, None)])


def test_unseeded_rows_draw_one_call_of_the_same_uniforms():
    """Unseeded rows take torch's global generator in row order, in one call when no row is seeded: the same
    picks as one draw a row (the path a batch with a seeded row takes)."""
    from hf_paged.engine.sampler import _draw

    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 0.3
    torch.manual_seed(11)
    batched = _draw(x[:5], [None] * 5)
    torch.manual_seed(11)
    per_row = _draw(x, [None] * 5 + [torch.Generator().manual_seed(1)])
    assert batched == per_row[:5]
    torch.manual_seed(12)
    assert _draw(x[:5], [None] * 5) != batched  # another seed, other picks: the rows did draw from it


def test_topk_rows_of_bf16_logits_match_generate(model, monkeypatch):
    """bf16 logits have many equal scores: most rows tie at their k-th score, and HF's TopK keeps every tie.
    Those rows take their candidates among the 4k + 64 best (where the ties end), not the whole row. Where
    TopP then cuts through a run of equal scores, which go depends on the order HF's sort of the whole row
    gives them: such rows take HF's full-width warpers (on the candidates alone another of the equal tokens
    survived, in ~1 row of 9). The processed scores are generate()'s in every case."""
    from hf_paged.engine import group_warp

    full_calls = []
    real = group_warp.TopKLogitsWarper
    monkeypatch.setattr(group_warp, "TopKLogitsWarper", lambda k: full_calls.append(k) or real(k))
    vocab = 8000
    logits = (torch.randn(120, vocab, generator=torch.Generator().manual_seed(1)) * 2.5 + 5).bfloat16().float()
    for opts in (dict(top_k=50, top_p=0.9), dict(top_k=20, top_p=0.8), dict(top_k=50), dict(top_k=40, min_p=0.05),
                 dict(top_k=50, typical_p=0.9), dict(top_k=50, temperature=0.7, top_p=0.95)):
        p = params(do_sample=True, **opts)
        ours = Sampler(vocab).process(logits.clone(), [SamplingRow(p, [1], 0, None)] * len(logits))
        ref = hf_processors(model, 1, do_sample=True, **opts)(torch.tensor([[1]] * len(logits)), logits.clone())
        assert_same_scores(ours, ref, str(opts))
    v = logits.topk(51).values
    assert (v[:, 50] == v[:, 49]).sum() > 40  # rows tie at the k-th score...
    assert len(full_calls) <= 4  # ...and only rows cut by top-p among equal scores take the whole row
