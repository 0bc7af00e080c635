"""PagedKVCache and wrap(): block sharing, errors, idempotence, direct forward calls."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import DynamicCache

import hf_paged
from hf_paged.kv.pool import parse_bytes
from tiny_models import PAD, build, load


@pytest.fixture(scope="module")
def llama(tiny_root):
    return load(build("llama", tiny_root))


@pytest.fixture
def wrapped(llama):
    hf_paged.wrap(llama, num_blocks=128, block_size=8)
    yield llama
    hf_paged.unwrap(llama)


def _ids(n, seed=0, batch=1):
    return torch.randint(3, 200, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_explicit_cache_holds_exactly_the_real_tokens(wrapped):
    cache = hf_paged.PagedKVCache(hf_paged.kv_pool(wrapped))
    ids = torch.cat([torch.full((1, 5), PAD), _ids(11)], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 11, dtype=torch.long)], 1)
    out = wrapped.generate(input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([mask, mask]),
                           past_key_values=cache, max_new_tokens=9, do_sample=False, min_new_tokens=9)
    assert out.shape[1] == 16 + 9
    # Padding is never stored: 11 prompt tokens + 8 fed-back tokens per row (the last one is not fed).
    assert [t.num_tokens for t in cache.tables] == [19, 19]
    assert cache.get_seq_length() == 16 + 8
    # The two identical rows shared their prompt's full block and copied the partial one on write.
    assert cache.tables[0].blocks[0] == cache.tables[1].blocks[0]
    assert cache.tables[0].blocks[1:] != cache.tables[1].blocks[1:]
    cache.allocator.check(cache.tables)
    cache.release()


def test_num_return_sequences_shares_prompt_blocks(wrapped):
    pool = hf_paged.kv_pool(wrapped)
    cache = hf_paged.PagedKVCache(pool)
    torch.manual_seed(0)
    wrapped.generate(input_ids=_ids(20), past_key_values=cache, max_new_tokens=6, do_sample=True,
                     num_return_sequences=3)
    shared = [b for b in cache.tables[0].blocks[:2]]
    assert all(t.blocks[:2] == shared for t in cache.tables)
    assert all(pool.allocator.ref_count(b) == 3 for b in shared)
    # 3 rows of 25 tokens: 2 shared full blocks + 2 private blocks each (one of them a copy).
    assert pool.allocator.num_used == 2 + 3 * 2
    cache.release()


def test_full_pool_raises_a_clear_error_and_frees_everything(llama):
    hf_paged.wrap(llama, num_blocks=3, block_size=8)
    try:
        with pytest.raises(hf_paged.KVCacheFullError, match="kv_memory or num_blocks"):
            llama.generate(input_ids=_ids(20), max_new_tokens=10, do_sample=False)
        assert hf_paged.kv_pool(llama).allocator.num_used == 0
        # The pool still serves a request that fits.
        out = llama.generate(input_ids=_ids(10), max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 14)
    finally:
        hf_paged.unwrap(llama)


def test_generate_up_to_the_model_context(llama):
    ctx = llama.config.max_position_embeddings
    ids = _ids(8)
    ref = llama.generate(input_ids=ids, max_new_tokens=ctx - 8, min_new_tokens=ctx - 8, do_sample=False)
    hf_paged.wrap(llama, num_blocks=ctx // 16 + 1, block_size=16)
    try:
        out = llama.generate(input_ids=ids, max_new_tokens=ctx - 8, min_new_tokens=ctx - 8, do_sample=False)
    finally:
        hf_paged.unwrap(llama)
    assert out.shape[1] == ctx and torch.equal(ref, out)


def test_direct_forward_matches_with_and_without_cache(llama):
    ids = _ids(12, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ref = llama(input_ids=ids, attention_mask=mask).logits
    hf_paged.wrap(llama, num_blocks=16, block_size=8)
    try:
        out = llama(input_ids=ids, attention_mask=mask)
        real = mask.bool()
        torch.testing.assert_close(out.logits[real], ref[real], atol=1e-4, rtol=1e-4)
        # The returned cache continues the sequence like HF's own cache would.
        nxt = torch.tensor([[7], [9]])
        step = llama(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                     past_key_values=out.past_key_values)
        full = llama(input_ids=torch.cat([ids, nxt], 1),
                     attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), use_cache=False)
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-4, rtol=1e-4)
        out.past_key_values.release()
        with pytest.raises(ValueError, match="paged blocks"):
            llama(input_ids=ids, past_key_values=DynamicCache(config=llama.config))
    finally:
        hf_paged.unwrap(llama)


def test_wrap_is_idempotent_and_unwrap_restores(llama):
    impl = llama.config._attn_implementation
    hf_paged.wrap(llama, num_blocks=8)
    pool = hf_paged.kv_pool(llama)
    hooks = len(llama._forward_pre_hooks)
    assert hf_paged.wrap(llama, num_blocks=8) is llama
    assert hf_paged.kv_pool(llama) is pool and len(llama._forward_pre_hooks) == hooks
    hf_paged.wrap(llama, num_blocks=12)  # other options rebuild the pool
    assert hf_paged.kv_pool(llama).num_blocks == 12 and len(llama._forward_pre_hooks) == hooks
    hf_paged.unwrap(llama)
    hf_paged.unwrap(llama)
    assert not hf_paged.is_wrapped(llama)
    assert llama.config._attn_implementation == impl and "generate" not in llama.__dict__
    assert not llama._forward_pre_hooks


def test_pool_sized_from_kv_memory(llama):
    hf_paged.wrap(llama, kv_memory="1MiB", block_size=16)
    try:
        pool = hf_paged.kv_pool(llama)
        per_block = 2 * 16 * 2 * 16 * 4 * 2  # k+v, tokens, kv heads, head dim, fp32, layers
        assert pool.num_blocks == 2**20 // per_block
        assert pool.nbytes <= 2**20 and pool.k[0].dtype == torch.float32
    finally:
        hf_paged.unwrap(llama)
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2GB") == 2_000_000_000
    for bad in ("lots", "-1GiB", 0):
        with pytest.raises(ValueError, match="kv_memory"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="block_size"):
        hf_paged.wrap(llama, num_blocks=4, block_size=12)


def test_unsupported_models_get_a_clear_error():
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                                   vocab_size=64))
    with pytest.raises(hf_paged.UnsupportedModelError, match="encoder-decoder.*llama"):
        hf_paged.wrap(t5)
    with pytest.raises(hf_paged.UnsupportedModelError, match="not a transformers generative model"):
        hf_paged.wrap(torch.nn.Linear(2, 2))
    assert not hf_paged.is_wrapped(t5)


def test_failed_forward_rolls_back_and_leaks_nothing(llama):
    hf_paged.wrap(llama, num_blocks=16, block_size=8)
    cache = hf_paged.PagedKVCache(hf_paged.kv_pool(llama))
    try:
        llama(input_ids=_ids(5), past_key_values=cache)
        with pytest.raises(IndexError):
            llama(input_ids=torch.tensor([[10**6]]), past_key_values=cache)  # out-of-vocabulary id
        assert [t.num_tokens for t in cache.tables] == [5] and cache.get_seq_length() == 5
        with pytest.raises(IndexError):
            llama(input_ids=torch.tensor([[10**6]]))  # the hook's own cache is released
        assert hf_paged.kv_pool(llama).allocator.num_used == 1
    finally:
        cache.release()
        hf_paged.unwrap(llama)
