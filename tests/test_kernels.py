"""Triton kernels vs the torch reference, and the reference vs a naive per-token oracle.

On CPU the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before
anything imports triton). With ``HF_PAGED_TEST_CUDA=1`` on a CUDA machine the same tests run the
compiled kernels on the GPU and add bf16.

Tolerances (absolute, against the fp32 reference computed on the same, already rounded inputs):
fp32 1e-4; fp16 2e-3; bf16 2e-2 (CUDA only). The reference must match the fp64 oracle to 1e-5.
Shapes stay small because the interpreter runs one program at a time in Python.
"""
import os

ON_CUDA = os.environ.get("HF_PAGED_TEST_CUDA") == "1"
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if ON_CUDA and not torch.cuda.is_available():
    pytest.skip("HF_PAGED_TEST_CUDA=1 but CUDA is not available", allow_module_level=True)
pytest.importorskip("triton")


def _interpret_triton_stdlib() -> None:
    """Make triton's own @jit helpers (tl.max, tl.sum, tl.zeros, ...) callable by the interpreter.

    ``triton.jit`` picks compiled or interpreted when a function is decorated. tests/conftest.py
    imports hf_paged, hence transformers, hence triton, before this module can set TRITON_INTERPRET,
    so triton's standard library was built for the compiler and the interpreter refuses to call it.
    Our kernels are decorated later (imported below) and are fine. No-op when the variable was set
    before triton was imported (e.g. by conftest or the shell).
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name, fn in list(vars(tl.standard).items()):
        if isinstance(fn, JITFunction):
            interpreted = InterpretedFunction(fn.fn)
            setattr(tl.standard, name, interpreted)
            if getattr(tl, name, None) is fn:
                setattr(tl, name, interpreted)


if not ON_CUDA:
    _interpret_triton_stdlib()

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hf_paged import kernels  # noqa: E402
from hf_paged.kernels import reference  # noqa: E402
from hf_paged.kernels.attention import paged_attention_triton  # noqa: E402
from hf_paged.kernels.cache_write import write_kv_triton  # noqa: E402
from hf_paged.kernels.decode import choose_num_splits, paged_decode  # noqa: E402
from hf_paged.kernels.prefill import PrefillTiles, default_tiles, paged_prefill  # noqa: E402

DEVICE = "cuda" if ON_CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
ORACLE_TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Batch construction and the oracle
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    query: torch.Tensor  # [T, H, D], T includes padding rows
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor

    def args(self) -> tuple:
        return (self.query, self.k_cache, self.v_cache, self.block_tables, self.cu_seqlens_q, self.seq_lens)

    def fp32_args(self) -> tuple:
        return (self.query.float(), self.k_cache.float(), self.v_cache.float(), self.block_tables,
                self.cu_seqlens_q, self.seq_lens)

    @property
    def num_real(self) -> int:
        return int(self.cu_seqlens_q[-1])


def make_batch(ctx_lens, q_lens, *, heads, kv_heads, head_dim, block_size, dtype, seed=0,
               pad_rows=2, garbage=1e4, table_fill=-1, spare_blocks=3) -> Batch:
    """Random K/V in shuffled blocks. Unused slots hold ``garbage`` so a kernel that reads past a
    sequence's end shows up; table entries past each sequence's last block hold ``table_fill``."""
    assert len(ctx_lens) == len(q_lens) and all(q <= c for q, c in zip(q_lens, ctx_lens))
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    width = max(blocks_per_seq, default=0) + 2  # wider than needed: the extra columns must not be read
    k = torch.full((num_blocks, block_size, kv_heads, head_dim), garbage)
    v = torch.full((num_blocks, block_size, kv_heads, head_dim), garbage)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(ctx_lens), width), table_fill, dtype=torch.int32)
    used = 0
    for i, c in enumerate(ctx_lens):
        ids = perm[used:used + blocks_per_seq[i]]
        used += blocks_per_seq[i]
        tables[i, :len(ids)] = ids.to(torch.int32)
        for p in range(0, c, block_size):
            n = min(block_size, c - p)
            b = int(ids[p // block_size])
            k[b, :n] = torch.randn(n, kv_heads, head_dim, generator=gen)
            v[b, :n] = torch.randn(n, kv_heads, head_dim, generator=gen)
    cu = torch.tensor([0] + list(torch.tensor(q_lens, dtype=torch.long).cumsum(0).tolist()), dtype=torch.int32)
    query = torch.randn(int(cu[-1]) + pad_rows, heads, head_dim, generator=gen)
    to = dict(device=DEVICE, dtype=dtype)
    return Batch(query.to(**to), k.to(**to), v.to(**to), tables.to(DEVICE), cu.to(DEVICE),
                 torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE))


def oracle(batch: Batch, *, scale, sliding_window=None, softcap=None) -> torch.Tensor:
    """fp64, one query token at a time, keys found slot by slot through the block table."""
    q, kc, vc, tables, cu, lens = (t.cpu() for t in batch.args())
    q, kc, vc = q.double(), kc.double(), vc.double()
    num_heads, kvh, bs = q.shape[1], kc.shape[2], kc.shape[1]
    kv_of_head = torch.arange(num_heads) // (num_heads // kvh)
    out = torch.zeros_like(q)
    for i in range(len(lens)):
        n, start, end = int(lens[i]), int(cu[i]), int(cu[i + 1])
        slots = [(int(tables[i, p // bs]), p % bs) for p in range(n)]
        keys = torch.stack([kc[b, o] for b, o in slots]) if slots else None  # [n, KVH, D]
        vals = torch.stack([vc[b, o] for b, o in slots]) if slots else None
        for t in range(start, end):
            pos = n - (end - start) + (t - start)
            visible = [j for j in range(n) if j <= pos and (not sliding_window or j > pos - sliding_window)]
            kk = keys[visible][:, kv_of_head]  # [m, H, D]
            vv = vals[visible][:, kv_of_head]
            s = torch.einsum("mhd,hd->hm", kk, q[t]) * scale
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            out[t] = torch.einsum("hm,mhd->hd", torch.softmax(s, -1), vv)
    return out


def check(batch: Batch, out: torch.Tensor, *, scale, sliding_window=None, softcap=None, with_oracle=True):
    """``out`` (a Triton result) against the fp32 reference; the reference against the oracle."""
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    expected = reference.paged_attention(*batch.fp32_args(), scale=scale, sliding_window=sliding_window,
                                         softcap=softcap)
    if with_oracle:
        exact = oracle(batch, scale=scale, sliding_window=sliding_window, softcap=softcap)
        torch.testing.assert_close(expected.cpu().double(), exact, atol=ORACLE_TOL, rtol=0)
    torch.testing.assert_close(out.float(), expected, atol=TOL[batch.query.dtype], rtol=0)
    assert not out[batch.num_real:].any(), "padding rows must come out as zeros"


def attention_case(ctx_lens, q_lens, *, group, kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32,
                   sliding_window=None, softcap=None, seed=0, small_tiles=False, **kw):
    """Run one batch through the Triton dispatcher (or, with ``small_tiles``, straight into the kernel
    with 16-key tiles and several splits) and check it."""
    batch = make_batch(ctx_lens, q_lens, heads=group * kv_heads, kv_heads=kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, seed=seed, **kw)
    scale = head_dim ** -0.5
    opts = dict(scale=scale, sliding_window=sliding_window, softcap=softcap)
    if not small_tiles:
        out = paged_attention_triton(*batch.args(), **opts, max_seqlen_q=max(q_lens))
    elif max(q_lens) > 1:
        out = paged_prefill(*batch.args(), **opts, tiles=PrefillTiles(max(16, group), 16, 4, 1))
    else:
        out = paged_decode(*batch.args(), **opts, num_splits=3, block_n=16)
    check(batch, out, scale=scale, sliding_window=sliding_window, softcap=softcap)


# ---------------------------------------------------------------------------------------------
# Reference vs oracle (torch only, fast)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 3.0), (20, 10.0)])
def test_reference_matches_oracle(window, softcap):
    # Mixed decode / chunked prefill / full prefill / a sequence with no new token.
    batch = make_batch([1, 33, 17, 50, 9], [1, 8, 17, 1, 0], heads=4, kv_heads=2, head_dim=32,
                       block_size=8, dtype=torch.float32, garbage=0.0)
    expected = oracle(batch, scale=0.3, sliding_window=window, softcap=softcap)
    got = reference.paged_attention(*batch.args(), scale=0.3, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(got.cpu().double(), expected, atol=ORACLE_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# write_kv
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads,head_dim,src_dtype,cache_dtype", [
    (2, 64, torch.float32, torch.float32),
    (1, 80, torch.float16, torch.float16),
    (3, 96, torch.float32, torch.float16),  # cast to the cache dtype on store
    (4, 128, torch.float16, torch.float32),
])
def test_write_kv_matches_reference(kv_heads, head_dim, src_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, tokens = 6, 8, 13
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[2, 7, 12]] = -1  # padding tokens: never written
    # HF hands K/V over as transposed views: the kernel must follow strides.
    key = torch.randn(kv_heads, tokens, head_dim, generator=gen).transpose(0, 1).to(DEVICE, src_dtype)
    value = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(DEVICE, src_dtype)
    sentinel = torch.full((num_blocks, block_size, kv_heads, head_dim), 7.0, dtype=cache_dtype, device=DEVICE)
    k_ref, v_ref, k_tri, v_tri = (sentinel.clone() for _ in range(4))
    slots = slots.to(DEVICE)
    reference.write_kv(key, value, k_ref, v_ref, slots)
    write_kv_triton(key, value, k_tri, v_tri, slots.to(torch.int32))
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0].cpu()] = False
    assert (k_tri.view(-1, kv_heads, head_dim)[untouched.to(DEVICE)] == 7.0).all()


def test_write_kv_all_padding_and_empty():
    cache = torch.zeros(2, 8, 1, 16, device=DEVICE)
    k = torch.ones(3, 1, 16, device=DEVICE)
    write_kv_triton(k, k, cache, cache, torch.full((3,), -1, device=DEVICE))
    write_kv_triton(k[:0], k[:0], cache, cache, torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert not cache.any()


def test_write_kv_rejects_bad_shapes():
    cache = torch.zeros(2, 8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="key/value"):
        write_kv_triton(torch.ones(3, 1, 16, device=DEVICE), torch.ones(3, 1, 16, device=DEVICE), cache, cache,
                        torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_triton(torch.ones(3, 2, 16, device=DEVICE), torch.ones(3, 2, 16, device=DEVICE), cache, cache,
                        torch.zeros(2, dtype=torch.long, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------
DECODE_CASES = [  # group, kv_heads, head_dim, block_size
    (1, 2, 64, 16), (2, 1, 80, 8), (4, 1, 96, 32), (8, 1, 128, 16), (4, 2, 128, 8), (2, 2, 16, 16),
    (3, 1, 64, 8),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group,kv_heads,head_dim,block_size", DECODE_CASES)
def test_decode_matches_reference(group, kv_heads, head_dim, block_size, dtype):
    # Context 1, block-boundary lengths, a long one; one sequence without a new token.
    ctx = [1, block_size, block_size + 1, 3 * block_size - 1, 300, 40]
    attention_case(ctx, [1, 1, 1, 1, 1, 0], group=group, kv_heads=kv_heads, head_dim=head_dim,
                   block_size=block_size, dtype=dtype)


@pytest.mark.parametrize("sliding_window,softcap", [(1, None), (24, None), (None, 5.0), (40, 30.0)])
def test_decode_window_softcap(sliding_window, softcap):
    attention_case([1, 23, 24, 25, 200], [1] * 5, group=4, kv_heads=1, block_size=8,
                   sliding_window=sliding_window, softcap=softcap)


@pytest.mark.parametrize("num_splits,block_n,window", [(2, 16, None), (3, 32, None), (5, 16, 70), (4, 128, None)])
def test_decode_split_k(num_splits, block_n, window):
    # Contexts shorter than num_splits tiles leave some splits empty; the merge must ignore them.
    batch = make_batch([3, 16, 130, 257], [1, 1, 1, 1], heads=4, kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=num_splits)
    out = paged_decode(*batch.args(), scale=0.125, sliding_window=window, num_splits=num_splits,
                       block_n=block_n)
    check(batch, out, scale=0.125, sliding_window=window, with_oracle=False)


def test_choose_num_splits():
    assert choose_num_splits(64, 8, 2048, num_sms=132) == 1  # 512 programs already fill the GPU
    assert choose_num_splits(1, 8, 8192, num_sms=132) == 32  # one long sequence: spread it (capped)
    assert choose_num_splits(2, 8, 1024, num_sms=132) == 4  # bounded by keys per split
    assert choose_num_splits(4, 4, 100, num_sms=132) == 1  # short contexts are never split
    assert choose_num_splits(3, 1, 4096, num_sms=1) == 1  # interpreter: one "SM"


# ---------------------------------------------------------------------------------------------
# Prefill / mixed batches
# ---------------------------------------------------------------------------------------------
PREFILL_CASES = [  # ctx_lens, q_lens, group, kv_heads, head_dim, block_size
    ([40, 17], [40, 17], 1, 2, 64, 16),  # plain prefill, empty prefix
    ([70, 33, 5], [20, 1, 5], 2, 1, 80, 8),  # chunked prefill + decode row + short prefill
    ([150, 64], [3, 64], 4, 1, 96, 32),  # prefix-cache hit (3 new tokens over 147 cached)
    ([129, 1, 60], [129, 1, 0], 8, 1, 128, 16),  # a row with no new tokens, a 1-token context
    ([100, 20], [37, 20], 4, 2, 32, 8),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ctx,qlens,group,kv_heads,head_dim,block_size", PREFILL_CASES)
def test_prefill_matches_reference(ctx, qlens, group, kv_heads, head_dim, block_size, dtype):
    attention_case(ctx, qlens, group=group, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                   dtype=dtype)


@pytest.mark.parametrize("sliding_window,softcap", [(1, None), (16, None), (None, 4.0), (33, 20.0)])
def test_prefill_window_softcap(sliding_window, softcap):
    attention_case([90, 40, 12], [50, 1, 12], group=2, kv_heads=1, block_size=8,
                   sliding_window=sliding_window, softcap=softcap)


@pytest.mark.parametrize("tiles,window,group", [
    (PrefillTiles(16, 16, 4, 1), None, 2),  # many full key tiles: the unmasked middle loop runs
    (PrefillTiles(32, 16, 4, 1), 20, 2),  # masked lower edge + middle + diagonal
    (PrefillTiles(64, 32, 4, 1), None, 2),
    # A group of 3: 5 tokens per 16-row tile, so query tiles start at every offset of a key tile.
    (PrefillTiles(16, 16, 4, 1), None, 3),
    (PrefillTiles(16, 16, 4, 1), 13, 3),
])
def test_prefill_small_tiles(tiles, window, group):
    batch = make_batch([120, 45, 7], [70, 45, 1], heads=group, kv_heads=1, head_dim=64, block_size=8,
                       dtype=torch.float32)
    out = paged_prefill(*batch.args(), scale=0.125, sliding_window=window, tiles=tiles)
    check(batch, out, scale=0.125, sliding_window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_tile_shapes(dtype):
    # The tile shapes a GPU launch would use, run here too.
    batch = make_batch([140, 9], [80, 1], heads=4, kv_heads=1, head_dim=128, block_size=16, dtype=dtype)
    tiles = default_tiles(128, dtype, 4, on_gpu=True)
    out = paged_prefill(*batch.args(), scale=0.1, tiles=tiles)
    check(batch, out, scale=0.1, with_oracle=False)
    dec = make_batch([140, 9], [1, 1], heads=4, kv_heads=1, head_dim=128, block_size=16, dtype=dtype)
    check(dec, paged_decode(*dec.args(), scale=0.1, block_n=64), scale=0.1, with_oracle=False)


def test_head_dim_256():
    attention_case([40, 9], [1, 1], group=2, head_dim=256, block_size=16)
    attention_case([40, 9], [20, 9], group=2, head_dim=256, block_size=16, dtype=torch.float16)


def test_unread_slots_may_hold_nan():
    # Unused slots full of NaN and -1 past each table row: nothing outside a sequence may leak in.
    for q_lens in ([1, 1, 1], [5, 1, 17]):
        batch = make_batch([21, 9, 17], q_lens, heads=2, kv_heads=1, head_dim=64, block_size=8,
                           dtype=torch.float32, garbage=float("nan"), table_fill=-1)
        out = paged_attention_triton(*batch.args(), scale=0.125)
        exact = oracle(batch, scale=0.125)
        torch.testing.assert_close(out.cpu().double(), exact, atol=TOL[torch.float32], rtol=0)


def test_empty_batch():
    # No sequences at all (only padding rows), and sequences that all have q_len 0.
    kc = torch.zeros(2, 8, 1, 32, device=DEVICE)
    q = torch.randn(3, 2, 32, device=DEVICE)
    none = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    out = paged_attention_triton(q, kc, kc, none.view(0, 1), none[:0].new_zeros(1), none, scale=0.1)
    assert out.shape == q.shape and not out.any()
    tables = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([3, 5], dtype=torch.int32, device=DEVICE)
    out = paged_attention_triton(q, kc, kc, tables, torch.zeros(3, dtype=torch.int32, device=DEVICE), lens, scale=0.1)
    assert not out.any()


def test_strided_query():
    # A [T, H, D] view with the token stride smaller than the head stride, as HF's transpose gives.
    batch = make_batch([30, 12], [30, 12], heads=4, kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, pad_rows=0)
    strided = batch.query.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    out = paged_attention_triton(strided, *batch.args()[1:], scale=0.125)
    check(batch, out, scale=0.125, with_oracle=False)



def test_strided_metadata_and_slots():
    """seq_lens, cu_seqlens_q and slot_mapping as strided views (columns of a wider tensor): read as the values
    they show, not as their storage (which would read the other column, or write out of the pool)."""
    batch = make_batch([40, 17], [40, 17], heads=2, kv_heads=1, head_dim=64, block_size=16,
                       dtype=torch.float32, pad_rows=0)
    q, kc, vc, tables, cu, lens = batch.args()
    column = lambda t: torch.stack([t, torch.full_like(t, 10_000)], 1)[:, 0]  # noqa: E731
    assert not column(lens).is_contiguous()
    out = paged_attention_triton(q, kc, vc, tables, column(cu), column(lens), scale=0.125, max_seqlen_q=40)
    check(batch, out, scale=0.125, with_oracle=False)
    key, value = torch.randn(4, 1, 16, device=DEVICE), torch.randn(4, 1, 16, device=DEVICE)
    slots = column(torch.tensor([3, 9, 1, 12], dtype=torch.int32, device=DEVICE))
    k_tri, v_tri = torch.zeros(2, 8, 1, 16, device=DEVICE), torch.zeros(2, 8, 1, 16, device=DEVICE)
    k_ref, v_ref = k_tri.clone(), v_tri.clone()
    write_kv_triton(key, value, k_tri, v_tri, slots)
    reference.write_kv(key, value, k_ref, v_ref, slots.long())
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref)


# ---------------------------------------------------------------------------------------------
# Randomised
# ---------------------------------------------------------------------------------------------
@st.composite
def batches(draw):
    block_size = draw(st.sampled_from([8, 16, 32]))
    num_seqs = draw(st.integers(1, 3))
    # Small tiles multiply the interpreter's work: keep their contexts shorter.
    small_tiles = draw(st.booleans())
    ctx, qlens = [], []
    for _ in range(num_seqs):
        c = draw(st.one_of(st.integers(1, 40), st.integers(1, 160 if small_tiles else 600)))
        kind = draw(st.sampled_from(["decode", "prefill", "chunk", "none"]))
        q = {"decode": 1, "prefill": c, "none": 0}.get(kind) or draw(st.integers(1, c))
        ctx.append(c)
        qlens.append(q)
    if sum(qlens) == 0:
        qlens[0] = 1
    return dict(
        ctx_lens=ctx, q_lens=qlens, block_size=block_size,
        group=draw(st.sampled_from([1, 2, 4, 8])), kv_heads=draw(st.integers(1, 2)),
        head_dim=draw(st.sampled_from([16, 64, 80, 96, 128])),
        dtype=draw(st.sampled_from(DTYPES)),
        sliding_window=draw(st.one_of(st.none(), st.integers(1, 300))),
        softcap=draw(st.one_of(st.none(), st.floats(1.0, 50.0))),
        seed=draw(st.integers(0, 2**16)),
        small_tiles=small_tiles,
    )


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=batches())
def test_random_batches(case):
    ctx, qlens = case.pop("ctx_lens"), case.pop("q_lens")
    # Triton dispatch and the reference see the same call; the oracle too, when it is cheap enough.
    attention_case(ctx, qlens, **case)


# ---------------------------------------------------------------------------------------------
# API: dispatch, env override, validation
# ---------------------------------------------------------------------------------------------
def test_resolve_backend_env(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("HF_PAGED_BACKEND", raising=False)
    monkeypatch.setenv("HF_PAGED_CPU_KERNEL", "0")  # auto on CPU: the compiled backend only when it is on
    assert kernels.resolve_backend("auto", cpu) == "torch"
    assert kernels.resolve_backend("triton", cpu) == "triton"
    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    assert kernels.resolve_backend("torch", cpu) == "triton"  # the env var wins
    monkeypatch.setenv("HF_PAGED_BACKEND", " Torch ")
    assert kernels.resolve_backend("triton", cpu) == "torch"
    monkeypatch.setenv("HF_PAGED_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.resolve_backend("auto", cpu)
    monkeypatch.delenv("HF_PAGED_BACKEND")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.resolve_backend("flash", cpu)


def test_public_api_runs_triton(monkeypatch):
    monkeypatch.delenv("HF_PAGED_BACKEND", raising=False)
    batch = make_batch([20, 5], [4, 1], heads=2, kv_heads=1, head_dim=32, block_size=8, dtype=torch.float32)
    slots = torch.tensor([3, -1], device=DEVICE)
    new = torch.randn(2, 1, 32, device=DEVICE)
    k_ref, v_ref = batch.k_cache.clone(), batch.v_cache.clone()
    reference.write_kv(new, new, k_ref, v_ref, slots)
    kernels.write_kv(new, new, batch.k_cache, batch.v_cache, slots, backend="triton")
    assert torch.equal(batch.k_cache, k_ref)
    out = kernels.paged_attention(*batch.args(), scale=0.2, backend="triton")
    check(batch, out, scale=0.2)


def _valid():
    return make_batch([10], [2], heads=4, kv_heads=2, head_dim=64, block_size=8, dtype=torch.float32).args()


@pytest.mark.parametrize("mutate,match", [
    (lambda a: (a[0][..., :48], *a[1:]), "differs from the cache"),
    (lambda a: (torch.zeros(3, 4, 300), torch.zeros(2, 8, 2, 300), torch.zeros(2, 8, 2, 300), *a[3:]), "head_dim"),
    (lambda a: (a[0], torch.zeros(2, 12, 2, 64), torch.zeros(2, 12, 2, 64), *a[3:]), "block_size"),
    (lambda a: (torch.zeros(3, 3, 64), *a[1:]), "multiple of num_kv_heads"),
    (lambda a: (a[0].half(), *a[1:]), "share a dtype"),
    (lambda a: (a[0].double(), a[1].double(), a[2].double(), *a[3:]), "dtype"),
    (lambda a: (a[0], a[1], a[2][:1], *a[3:]), "k_cache/v_cache"),
    (lambda a: (*a[:3], a[3].float(), *a[4:]), "block_tables must be int"),
    (lambda a: (*a[:4], a[4][:1], a[5]), "cu_seqlens_q"),
    (lambda a: (*a[:3], a[3][:, None], *a[4:]), "block_tables"),
    (lambda a: (a[0][0], *a[1:]), "query"),
])
def test_validation_errors(mutate, match):
    args = mutate(_valid())
    with pytest.raises(ValueError, match=match):
        paged_attention_triton(*args, scale=0.1)


def test_negative_softcap_rejected():
    with pytest.raises(ValueError, match="softcap"):
        paged_attention_triton(*_valid(), scale=0.1, softcap=-1.0)
    for backend in ("torch", "cpu", "auto"):  # every backend, not only Triton's validation
        with pytest.raises(ValueError, match="softcap must be positive"):
            kernels.paged_attention(*_valid(), scale=0.1, softcap=-1.0, backend=backend)


def test_scale_matters():
    # Guards against a kernel that ignores ``scale`` (every other test uses about 1/sqrt(D)).
    batch = make_batch([33], [5], heads=1, kv_heads=1, head_dim=16, block_size=8, dtype=torch.float32)
    for scale in (0.0, 1.7):
        check(batch, paged_attention_triton(*batch.args(), scale=scale), scale=scale)


def test_triton_launches_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device; the entry points make the tensors' device current
    first (a model on cuda:1 would otherwise run its kernels on cuda:0), and change nothing when it is."""
    import hf_paged.kernels as kernels

    entered = []

    class Guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    class Fake:
        def __init__(self, device):
            self.device = torch.device(device)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    for device, want in (("cuda:1", [1]), ("cuda:0", []), ("cpu", [])):
        entered.clear()
        with kernels.on_device(Fake(device)):
            pass
        assert entered == want, device
    # The entry points go through it: write_kv's Triton branch on a "cuda:1" key.
    import hf_paged.kernels.cache_write as cache_write

    calls = []
    monkeypatch.setattr(cache_write, "write_kv_triton", lambda *a: calls.append(list(entered)))
    entered.clear()
    kernels.write_kv(Fake("cuda:1"), None, None, None, None, backend="triton")
    assert calls == [[1]]
