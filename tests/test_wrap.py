"""wrap(model).generate() equals the unwrapped model's generate() token for token, per architecture."""
from __future__ import annotations

import pytest
import torch

import hf_paged
from tiny_models import ARCHS, PAD, VOCAB, build, load

MAX_NEW = 24


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tiny_root):
    return load(build(request.param, tiny_root))


def _batch(lengths: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _both(model, batch, seed: int = 0, **gen):
    """(unwrapped, wrapped) generate outputs of the same call; the model is unwrapped afterwards."""
    torch.manual_seed(seed)
    ref = model.generate(**batch, **gen)
    hf_paged.wrap(model, num_blocks=96, block_size=8)
    try:
        torch.manual_seed(seed)
        out = model.generate(**batch, **gen)
    finally:
        hf_paged.unwrap(model)
    return ref, out


def test_greedy_batch_of_one(model):
    ref, out = _both(model, _batch([13]), max_new_tokens=MAX_NEW, do_sample=False)
    assert torch.equal(ref, out)


def test_greedy_left_padded_mixed_lengths(model):
    ref, out = _both(model, _batch([5, 30, 17, 9]), max_new_tokens=MAX_NEW, do_sample=False,
                     return_dict_in_generate=True, output_logits=True)
    assert torch.equal(ref.sequences, out.sequences)
    for step, (a, b) in enumerate(zip(ref.logits, out.logits)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=f"logits differ at step {step}")


def test_sampling_num_return_sequences(model):
    ref, out = _both(model, _batch([11, 6]), seed=123, max_new_tokens=MAX_NEW, do_sample=True,
                     num_return_sequences=3, top_k=0, temperature=1.0)
    assert ref.shape[0] == 6
    assert torch.equal(ref, out)


def test_beam_search(model):
    ref, out = _both(model, _batch([10, 4]), max_new_tokens=16, num_beams=3, do_sample=False,
                     num_return_sequences=2, early_stopping=True)
    assert torch.equal(ref, out)


def test_greedy_without_a_cache(model):
    """use_cache=False: every forward sees the whole sequence (the paged cache of a forward is its own)."""
    ref, out = _both(model, _batch([5, 12]), max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(ref, out)
    # With inputs_embeds generate() turns the cache back on (the paged one).
    batch = _batch([5, 12])
    embeds = {"inputs_embeds": model.get_input_embeddings()(batch["input_ids"]),
              "attention_mask": batch["attention_mask"]}
    ref, out = _both(model, embeds, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(ref, out)


def _repeating(n: int = 20, seed: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 60, (1, n), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([ids, ids[:, : n // 2]], 1)  # the prompt repeats itself: prompt lookup finds drafts
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_prompt_lookup_and_assisted_decoding(model):
    """Speculative paths crop the cache: crop(-k) after rejected drafts and crop(0) when all were taken (a
    no-op; it used to drop the whole cache). An identical assistant has every draft accepted."""
    import copy

    ref = model.generate(**_repeating(), max_new_tokens=16, do_sample=False)
    for kw in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=copy.deepcopy(model))):
        _, out = _both(model, _repeating(), max_new_tokens=16, do_sample=False, **kw)
        assert torch.equal(ref, out), kw.keys()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lengths", [[13], [5, 30, 17, 9]], ids=["one", "mixed"])
def test_bf16_greedy_equals_unwrapped_bf16(arch, lengths, tiny_root):
    """bf16 end to end (KV pool, attention, C++/oneDNN linears, fused RMSNorm): the same greedy tokens
    as the unwrapped bf16 model. Both round to bf16 at different points (the paged kernels accumulate
    attention in fp32), so their logits differ by a few bf16 steps; where a row's tokens differ, the
    first differing token must be a near-tie that this difference explains (the tie margin)."""
    model = load(build(arch, tiny_root)).to(torch.bfloat16)
    ref, out = _both(model, _batch(lengths), max_new_tokens=MAX_NEW, do_sample=False,
                     return_dict_in_generate=True, output_logits=True)
    width = ref.sequences.shape[1] - len(ref.logits)
    for row in range(len(lengths)):
        for step, (a, b) in enumerate(zip(ref.logits, out.logits)):
            a, b = a[row].float(), b[row].float()
            scale = float(a.abs().max())
            noise = float((a - b).abs().max())
            assert noise <= 0.05 * scale, (arch, row, step, noise, scale)  # a few bf16 steps at most
            want, got = int(ref.sequences[row, width + step]), int(out.sequences[row, width + step])
            if want != got:
                gap = float(a[want] - a[got])
                assert 0 <= gap <= 2 * noise, (arch, row, step, gap, noise)  # a near-tie the noise flips
                print(f"{arch} row {row}: differs at token {step}, a near-tie (gap {gap:.4f}, noise {noise:.4f})")
                break


def test_default_model_chat_reply_unchanged_by_wrap():
    model, tok = hf_paged.load_default_model()
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Give me two rhymes for 'cat'."}]]
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ref, out = _both(model, batch, max_new_tokens=32, do_sample=False)
    assert torch.equal(ref, out)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_triton_backend_generates_the_same_tokens(arch, tiny_root, monkeypatch):
    """End to end through Triton's interpreter (TRITON_INTERPRET=1, set by conftest) vs the torch path."""
    model = load(build(arch, tiny_root))
    batch = _batch([9, 20])
    hf_paged.wrap(model, num_blocks=32, block_size=8)
    try:
        monkeypatch.setenv("HF_PAGED_BACKEND", "torch")
        ref = model.generate(**batch, max_new_tokens=6, do_sample=False)
        monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    finally:
        hf_paged.unwrap(model)
    assert torch.equal(ref, out)


def test_no_mask_creation_on_the_wrapped_forward(tiny_root, monkeypatch):
    """No mask function is registered for "hf_paged", so transformers skips mask creation, including its
    packed-sequence check on the position ids (a host sync per eager forward on a GPU)."""
    import transformers.masking_utils as mu

    from hf_paged.engine.pipeline import PagedPipeline
    from tiny_models import IdTokenizer

    def boom(*a, **k):
        raise AssertionError("mask creation ran for a wrapped model")

    monkeypatch.setattr(mu, "find_packed_sequence_indices", boom)
    monkeypatch.setattr(mu, "sdpa_mask", boom)
    for arch in ("llama", "gemma3_text"):
        model = load(build(arch, tiny_root))
        batch = _batch([5, 12])  # parity with the unwrapped model (which creates masks) is tested above
        hf_paged.wrap(model, num_blocks=32, block_size=8)
        try:
            out = model.generate(**batch, max_new_tokens=6, do_sample=False)
            assert out.shape == (2, 18)
        finally:
            hf_paged.unwrap(model)
        with PagedPipeline(model, IdTokenizer(), max_num_seqs=4) as pipe:
            assert len(pipe.generate([[5, 6, 7], [8, 9]], max_new_tokens=5)[0].token_ids) == 5
        hf_paged.unwrap(model)


def test_masks_and_caches_the_paged_attention_cannot_honour_are_refused(tiny_root):
    """A 4D mask, packed sequences (restarting position ids, no mask) and cache_implementation would be
    ignored by the paged attention: a clear ValueError, and no block stays taken."""
    model = load(build("llama", tiny_root))
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    for s in (0, 5):  # two packed documents of 5 tokens
        mask[0, 0, s:s + 5, s:s + 5] = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    hf_paged.wrap(model, num_blocks=32, block_size=8)
    try:
        with torch.no_grad():
            with pytest.raises(ValueError, match="2D attention_mask"):
                model(input_ids=ids, attention_mask=mask, position_ids=pos)
            with pytest.raises(ValueError, match="position_ids that restart"):
                model(input_ids=ids, position_ids=pos)
            with pytest.raises(ValueError, match="cache_implementation='static'"):
                model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static")
            model(input_ids=ids, position_ids=torch.arange(10).view(1, -1))  # one sequence: fine
        assert hf_paged.kv_pool(model).allocator.num_free == 32
    finally:
        hf_paged.unwrap(model)


def test_an_interrupted_forward_is_rolled_back_in_a_passed_cache(tiny_root):
    """Ctrl-C inside a forward skips the forward hooks that account or roll back its step: the next use of
    the cache rolls it back, so the cache holds exactly what its length says, and generation goes on from
    there as an uninterrupted run would."""
    model = load(build("llama", tiny_root))
    batch = _batch([12])
    ref = model.generate(**batch, max_new_tokens=6, do_sample=False)
    hf_paged.wrap(model, num_blocks=32, block_size=8)
    try:
        cache = hf_paged.PagedKVCache(hf_paged.kv_pool(model))
        key = model._hf_paged.cache_kwarg  # "cache", or "past_key_values" before transformers 5.2x
        calls = {"n": 0}

        def interrupt(mod, args):
            calls["n"] += 1
            if calls["n"] == 3:  # inside the third forward (the second decode step)
                raise KeyboardInterrupt
        hook = model.model.layers[1].register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            model.generate(**batch, max_new_tokens=6, do_sample=False, **{key: cache})
        hook.remove()
        cache.crop(0)
        assert [t.num_tokens for t in cache.tables] == [cache.get_seq_length()] == [13]
        # Continue from the cache: the prompt and the first generated token are in it.
        again = model.generate(input_ids=ref[:, :14], attention_mask=torch.ones_like(ref[:, :14]),
                               max_new_tokens=4, do_sample=False, **{key: cache})
        assert torch.equal(again, ref[:, :18])
        cache.release()
        assert hf_paged.kv_pool(model).allocator.num_free == 32
    finally:
        hf_paged.unwrap(model)
