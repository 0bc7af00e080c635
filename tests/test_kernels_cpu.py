"""The compiled CPU backend (hf_paged/kernels/cpu.py + csrc/paged_attention_cpu.cpp) and the CPU linear layers.

The C++ decode kernel is checked against the fp64 oracle of test_kernels.py and against the torch
path, on shuffled block tables whose unused slots hold huge values (a read past a sequence's end
shows up), with GQA, several head dims (AVX2 path and the generic one), window and softcap, mixed
decode/prefill batches and empty sequences. The first test here builds the extension (~20-30 s once;
cached afterwards).
"""
from __future__ import annotations

import pytest
import torch

from hf_paged import kernels
from hf_paged.kernels import cpu, cpu_layers, reference
from test_kernels import make_batch, oracle

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"C++ CPU kernel not built: {cpu.build_error()}")

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (9, 3, 64), (8, 1, 128), (4, 2, 80), (4, 2, 256),
                                                     (6, 2, 12)])
@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 30.0), (5, 20.0)])
def test_decode_matches_oracle(dtype, heads, kv_heads, head_dim, window, softcap):
    ctx = [1, 15, 16, 17, 100, 333]
    batch = make_batch(ctx, [1] * len(ctx), heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=16,
                       dtype=dtype, seed=head_dim + heads)
    scale = head_dim ** -0.5
    got = cpu.paged_attention(*batch.args(), scale=scale, sliding_window=window, softcap=softcap)
    want = oracle(batch, scale=scale, sliding_window=window, softcap=softcap)
    n = batch.num_real
    torch.testing.assert_close(got[:n].double(), want[:n], atol=TOL[dtype], rtol=0)
    assert not got[n:].any(), "padding rows must stay zero"


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_mixed_batch_and_block_sizes(block_size):
    # Decode rows, prefill chunks over a cached prefix, an empty sequence (q_len 0) and a length-1 prompt.
    ctx, q_lens = [40, 70, 5, 1, 33, 0], [1, 12, 5, 1, 1, 0]
    batch = make_batch(ctx, q_lens, heads=6, kv_heads=2, head_dim=32, block_size=block_size, dtype=torch.float32)
    got = cpu.paged_attention(*batch.args(), scale=0.2, sliding_window=9)
    want = oracle(batch, scale=0.2, sliding_window=9)
    n = batch.num_real
    torch.testing.assert_close(got[:n].double(), want[:n], atol=1e-4, rtol=0)


def _has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in f)
    except OSError:
        return False


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 64), (16, 8, 128), (8, 1, 128), (4, 2, 80),
                                                     (4, 1, 256), (4, 2, 256), (16, 1, 64), (8, 1, 64)])
@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 30.0)])
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_bf16_decode_blocks_avx512_against_avx2_and_the_oracle(heads, kv_heads, head_dim, window, softcap,
                                                               block_size):
    """The AVX-512 BF16 blocks (on a CPU that has them; shapes they cannot take fall back) against the AVX2
    blocks and the fp64 oracle, on shuffled blocks with huge values past each sequence's end. Contexts of
    1, 15, 16 and 17 tokens end in partial groups of 16 scores; block 64 has several groups per block; a
    window starts inside a block."""
    ctx = [1, 15, 16, 17, 100, 333, 40]
    batch = make_batch(ctx, [1] * len(ctx), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=torch.bfloat16, seed=head_dim + heads)
    scale = head_dim ** -0.5
    want = oracle(batch, scale=scale, sliding_window=window, softcap=softcap)
    n = batch.num_real
    outs = {}
    try:
        for on in (True, False):
            outs[torch.ops.hf_paged_cpu.set_paged_decode_dpbf16(on)] = cpu.paged_attention(
                *batch.args(), scale=scale, sliding_window=window, softcap=softcap)
    finally:
        torch.ops.hf_paged_cpu.set_paged_decode_dpbf16(True)
    if _has_avx512_bf16():  # built with -march=native: the blocks must be there
        assert set(outs) == {"avx512_bf16", "avx2"}
    for got in outs.values():
        torch.testing.assert_close(got[:n].double(), want[:n], atol=TOL[torch.bfloat16], rtol=0)
    if len(outs) == 2:  # both paths exist here: they agree to bf16 rounding
        a, b = outs.values()
        torch.testing.assert_close(a[:n].float(), b[:n].float(), atol=8e-3, rtol=1e-2)


def _new_kv(batch):
    """Each sequence's last q_len keys and values, packed like the queries (what the layer just computed)."""
    q, kc, vc, tables, cu, lens = batch.args()
    bs, ks, vs = kc.shape[1], [], []
    for i in range(len(lens)):
        n, q_len = int(lens[i]), int(cu[i + 1] - cu[i])
        for p in range(n - q_len, n):
            ks.append(kc[int(tables[i, p // bs]), p % bs])
            vs.append(vc[int(tables[i, p // bs]), p % bs])
    return torch.stack(ks), torch.stack(vs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
def test_prompts_without_context_attend_over_the_new_kv(dtype, window):
    # Decode rows, two fresh prompts (seq_len == q_len), chunks over cached context, a 1-token prompt.
    ctx, q_lens = [40, 23, 70, 9, 1, 130], [1, 23, 12, 9, 1, 50]
    batch = make_batch(ctx, q_lens, heads=6, kv_heads=2, head_dim=32, block_size=8, dtype=dtype, seed=5)
    want = oracle(batch, scale=0.2, sliding_window=window)
    new_kv = _new_kv(batch)
    # The fresh prompts' blocks are spoiled: a path that read them instead of new_kv would fail.
    spoiled = make_batch(ctx, q_lens, heads=6, kv_heads=2, head_dim=32, block_size=8, dtype=dtype, seed=5)
    for i in (1, 3):
        for b in spoiled.block_tables[i, : -(-ctx[i] // 8)].tolist():
            spoiled.k_cache[b] = 1e3
            spoiled.v_cache[b] = -1e3
    n = batch.num_real
    for impl in (reference.paged_attention, cpu.paged_attention):
        got = impl(*spoiled.args(), scale=0.2, sliding_window=window, new_kv=new_kv)
        torch.testing.assert_close(got[:n].double(), want[:n], atol=TOL[dtype], rtol=0)
        assert not got[n:].any()
        # Without new_kv every prompt reads its blocks (the unspoiled batch gives the same rows).
        plain = impl(*batch.args(), scale=0.2, sliding_window=window)
        torch.testing.assert_close(plain[:n].double(), want[:n], atol=TOL[dtype], rtol=0)


def test_decode_equals_torch_path_on_many_sequences():
    gen = torch.Generator().manual_seed(3)
    ctx = torch.randint(1, 600, (48,), generator=gen).tolist()
    batch = make_batch(ctx, [1] * len(ctx), heads=9, kv_heads=3, head_dim=64, block_size=16, dtype=torch.float32)
    a = cpu.paged_attention(*batch.args(), scale=0.125)
    b = reference.paged_attention(*batch.args(), scale=0.125)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    # The pure-decode fast path (max_seqlen_q=1, no padding rows) gives the same rows.
    n = batch.num_real
    args = (batch.query[:n],) + batch.args()[1:]
    fast = cpu.paged_attention(*args, scale=0.125, max_seqlen_q=1, max_seqlen_k=max(ctx))
    assert torch.equal(fast, a[:n])


def test_decode_op_validates_its_inputs():
    batch = make_batch([5], [1], heads=4, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32)
    q, kc, vc, tables, cu, lens = batch.args()
    out = torch.zeros_like(q)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu.paged_decode(q.double(), kc, vc, tables, cu, lens, out, scale=1.0)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        cpu.paged_decode(q[:, :3], kc, vc, tables, cu, lens, out[:, :3], scale=1.0)
    with pytest.raises(RuntimeError, match="out must have"):
        cpu.paged_decode(q, kc, vc, tables, cu, lens, out[:1], scale=1.0)


def test_auto_backend_on_cpu_is_the_compiled_one(monkeypatch):
    q = torch.zeros(1, 2, 4)
    monkeypatch.delenv("HF_PAGED_BACKEND", raising=False)
    assert kernels.resolve_backend("auto", q) == "cpu"
    monkeypatch.setenv("HF_PAGED_CPU_KERNEL", "0")
    assert kernels.resolve_backend("auto", q) == "torch"


def test_failed_build_falls_back_to_torch(monkeypatch, caplog):
    saved = dict(cpu._state)
    cpu._state.clear()

    def broken():
        raise OSError("no compiler here")

    monkeypatch.setattr(cpu, "_build", broken)
    monkeypatch.delenv("HF_PAGED_BACKEND", raising=False)
    try:
        with caplog.at_level("WARNING"):
            assert kernels.resolve_backend("auto", torch.zeros(1)) == "torch"
        assert "could not be built" in caplog.text and isinstance(cpu.build_error(), OSError)
        batch = make_batch([7, 3], [1, 3], heads=2, kv_heads=1, head_dim=8, block_size=4, dtype=torch.float32)
        out = kernels.paged_attention(*batch.args(), scale=0.3)  # still answers, on the torch path
        torch.testing.assert_close(out[:4].double(), oracle(batch, scale=0.3)[:4], atol=1e-4, rtol=0)
        with pytest.raises(RuntimeError, match="not available"):
            cpu.paged_attention(*batch.args(), scale=0.3)
    finally:
        cpu._state.clear()
        cpu._state.update(saved)


# ------------------------------------------------------------------------------------- linear layers
def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16, bias=False))


def _oracle_linear(x, w, b=None):
    y = x.double() @ w.double().T
    return (y if b is None else y + b.double()).float()


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 24, 47, 48, 49, 130])
@pytest.mark.parametrize("n,k", [(1, 8), (5, 7), (6, 16), (13, 33), (96, 64), (250, 576)])
def test_skinny_linear_matches_oracle(m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen)
    torch.testing.assert_close(cpu.skinny_linear(x, w, b), _oracle_linear(x, w, b), atol=2e-5 * k ** 0.5, rtol=1e-5)
    torch.testing.assert_close(cpu.skinny_linear(x, w), _oracle_linear(x, w), atol=2e-5 * k ** 0.5, rtol=1e-5)


def test_skinny_linear_strided_input_threads_and_errors():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(9, 80, generator=gen)
    x = base[:, 5:69]  # rows with a stride larger than their length
    w = torch.randn(37, 64, generator=gen)
    want = _oracle_linear(x, w)
    torch.testing.assert_close(cpu.skinny_linear(x, w), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cpu.skinny_linear(x.t().contiguous().t(), w), want, atol=1e-4, rtol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.skinny_linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, cpu.skinny_linear(x, w))  # the split over threads does not change sums
    assert cpu.skinny_linear(torch.randn(0, 64), w).shape == (0, 37)
    with pytest.raises(RuntimeError, match="float32"):
        cpu.skinny_linear(x.double(), w.double())
    with pytest.raises(RuntimeError, match=r"input \[M, K\]"):
        cpu.skinny_linear(torch.randn(4, 63), w)
    with pytest.raises(RuntimeError, match="bias"):
        cpu.skinny_linear(x, w, torch.randn(36))


@pytest.mark.parametrize("rows", [1, 7, 16, 48, 300])  # skinny kernel, then oneDNN above fp32_skinny_rows()
def test_cpu_linears_install_and_remove(rows):
    model = _mlp()
    x = torch.randn(rows, 1, 32)
    with torch.inference_mode():
        want = model(x)
    assert cpu_layers.install_cpu_linears(model) == 2
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.shape == (rows, 1, 16)
    cpu_layers.remove_cpu_linears(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_cpu_linears_route_by_row_count(monkeypatch):
    model = _mlp()
    cpu_layers.install_cpu_linears(model)
    calls = []
    skinny, onednn = torch.ops.hf_paged_cpu.skinny_linear, torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.hf_paged_cpu, "skinny_linear", lambda *a: calls.append("skinny") or skinny(*a))
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append("onednn") or onednn(*a))
    rows = cpu_layers.fp32_skinny_rows(16)
    assert rows == (cpu_layers.SKINNY_MAX_ROWS_AVX512 if torch.backends.cpu.get_cpu_capability() == "AVX512"
                    else cpu_layers.SKINNY_MAX_ROWS)
    with torch.inference_mode():
        model(torch.randn(rows, 32))
        assert calls == ["skinny", "skinny"]
        model(torch.randn(rows + 1, 32))
        assert calls[2:] == ["onednn", "onednn"]


def test_cpu_linears_wide_output_layers_leave_the_skinny_kernel_sooner_on_avx512(monkeypatch):
    """On AVX-512 a vocabulary-wide layer takes oneDNN from WIDE_SKINNY_MAX_ROWS + 1 rows, narrower ones from
    SKINNY_MAX_ROWS_AVX512 + 1; on AVX2 both keep the skinny kernel up to SKINNY_MAX_ROWS."""
    wide, narrow = torch.nn.Linear(8, cpu_layers.WIDE_OUT_FEATURES), torch.nn.Linear(8, 64)
    model = torch.nn.ModuleList([wide, narrow])
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu_layers.install_cpu_linears(model) == 2
    assert wide._hf_paged_skinny_rows == cpu_layers.WIDE_SKINNY_MAX_ROWS
    assert narrow._hf_paged_skinny_rows == cpu_layers.SKINNY_MAX_ROWS_AVX512
    calls = []
    skinny, onednn = torch.ops.hf_paged_cpu.skinny_linear, torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.hf_paged_cpu, "skinny_linear", lambda *a: calls.append("skinny") or skinny(*a))
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append("onednn") or onednn(*a))
    for rows, want in ((cpu_layers.WIDE_SKINNY_MAX_ROWS, "skinny"), (cpu_layers.WIDE_SKINNY_MAX_ROWS + 1, "onednn")):
        x = torch.randn(rows, 8)
        with torch.inference_mode():
            torch.testing.assert_close(wide(x), torch.nn.functional.linear(x, wide.weight, wide.bias),
                                       atol=1e-5, rtol=1e-5)
        assert calls.pop() == want
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_layers.install_cpu_linears(model) == 2
    assert wide._hf_paged_skinny_rows == narrow._hf_paged_skinny_rows == cpu_layers.SKINNY_MAX_ROWS


def test_cpu_linears_leave_training_to_f_linear(monkeypatch):
    model = _mlp()
    cpu_layers.install_cpu_linears(model)
    calls = []
    real = torch.ops.hf_paged_cpu.skinny_linear

    monkeypatch.setattr(torch.ops.hf_paged_cpu, "skinny_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 32, requires_grad=True)
    model(x).sum().backward()  # grad mode: F.linear, so gradients flow
    assert x.grad is not None and not calls
    with torch.no_grad():
        model(x)
    assert len(calls) == 2


def test_cpu_linears_leave_a_trainable_bias_and_autocast_to_f_linear():
    """A frozen weight with a trainable bias (BitFit) gets its bias gradient, and CPU autocast its bf16 output:
    both are F.linear's, which the kernels would skip."""
    for rows in (3, 40):  # the skinny kernel, then oneDNN
        model = _mlp()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.requires_grad_(False)
        cpu_layers.install_cpu_linears(model)
        model(torch.randn(rows, 32)).sum().backward()
        assert model[0].bias.grad is not None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(torch.randn(rows, 32)).dtype == torch.bfloat16
        cpu_layers.remove_cpu_linears(model)


def test_cpu_linears_keep_a_forward_of_the_instance():
    """A layer whose forward was replaced per instance (accelerate's hooks, a user's patch) keeps it, also
    after remove()."""
    model = _mlp()
    layer = model[0]
    layer.forward = lambda x, f=layer.forward: 2 * f(x)
    assert cpu_layers.install_cpu_linears(model) == 1
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = 2 * torch.nn.functional.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(layer(x), want)
        cpu_layers.remove_cpu_linears(model)
        torch.testing.assert_close(layer(x), want)


def test_packed_bf16_weights_follow_a_peft_merge():
    """PEFT merges an adapter through weight.data (no version counter moves): the packed oneDNN copy is made
    again after merge/unmerge, so merged outputs are the merged weights'."""
    peft = pytest.importorskip("peft")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    pm = peft.get_peft_model(Net().bfloat16(), peft.LoraConfig(r=4, target_modules=["proj"],
                                                               init_lora_weights=False))
    x = torch.randn(4, 64).bfloat16()
    with torch.no_grad():
        want = pm(x)
        cpu_layers.install_cpu_linears(pm.get_base_model())
        assert pm.base_model.model.proj.base_layer._hf_paged_packed is not None
        pm.merge_adapter()
        torch.testing.assert_close(pm(x), want, atol=0.05, rtol=0.02)  # before: 1.9 off, the unmerged weights
        pm.unmerge_adapter()
        torch.testing.assert_close(pm(x), want, atol=0.05, rtol=0.02)
        cpu_layers.remove_cpu_linears(pm.get_base_model())
        assert "merge" not in pm.base_model.model.proj.__dict__


def test_decode_takes_a_query_whose_head_dim_is_strided():
    batch = make_batch([5, 9], [1, 1], heads=4, kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32)
    q, rest = batch.query[: batch.num_real], batch.args()[1:]
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, head_dim not unit-stride
    assert strided.stride(-1) != 1
    for hint in (1, None):  # the pure-decode path and the general one
        want = cpu.paged_attention(q, *rest, scale=0.25, max_seqlen_q=hint)
        torch.testing.assert_close(cpu.paged_attention(strided, *rest, scale=0.25, max_seqlen_q=hint), want)


def test_cpu_linears_skip_other_dtypes_and_can_be_disabled(monkeypatch):
    assert cpu_layers.install_cpu_linears(_mlp().double()) == 0
    monkeypatch.setenv("HF_PAGED_CPU_GEMM", "0")
    model = _mlp()
    assert cpu_layers.install_cpu_linears(model) == 2  # oneDNN only
    assert model[0]._hf_paged_skinny_rows == 0
    monkeypatch.setenv("HF_PAGED_ONEDNN_LINEAR", "0")
    assert cpu_layers.install_cpu_linears(_mlp()) == 0


def test_wrap_installs_and_unwrap_removes_cpu_linears_and_norms(tmp_path):
    import hf_paged
    from tiny_models import build, load

    model = load(build("llama", tmp_path))
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    hf_paged.wrap(model, num_blocks=16)
    assert all("forward" in m.__dict__ and m._hf_paged_skinny_rows == cpu_layers.fp32_skinny_rows(m.out_features)
               for m in linears)
    assert norms and all("forward" in m.__dict__ for m in norms)
    hf_paged.unwrap(model)
    assert not any("forward" in m.__dict__ or "_hf_paged_skinny_rows" in m.__dict__ for m in linears + norms)


# ------------------------------------------------------------------------------------------- bf16 linears
@pytest.mark.parametrize("m,k,n", [(1, 576, 192), (2, 100, 37), (3, 31, 5), (5, 1536, 64), (48, 64, 9)])
@pytest.mark.parametrize("dpbf16", [True, False])  # False: the AVX2 path, also where avx512_bf16 exists
@pytest.mark.parametrize("with_bias", [True, False])
def test_bf16_skinny_linear_matches_oracle(m, k, n, dpbf16, with_bias):
    g = torch.Generator().manual_seed(m * k + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.1).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if with_bias else None
    y = cpu.skinny_linear_bf16(x, w, b, allow_dpbf16=dpbf16)
    want = x.double() @ w.double().T + (b.double() if b is not None else 0)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    # fp32 accumulation, then one rounding to bf16: within half a bf16 ulp (2**-9 relative) and a hair.
    torch.testing.assert_close(y.double(), want, rtol=2 ** -8, atol=1e-4)


def test_bf16_linears_install_by_isa_and_can_be_disabled(monkeypatch, tmp_path):
    import hf_paged
    from tiny_models import build, load

    path = cpu.bf16_linear_path()
    assert path in cpu_layers.BF16_SKINNY_MAX_ROWS
    model = load(build("llama", tmp_path)).to(torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 12, 7, 30, 2, 200]])
    want = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    hf_paged.wrap(model, num_blocks=16)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    rows = min(cpu_layers.BF16_SKINNY_MAX_ROWS[path], cpu_layers.BF16_SKINNY_ROWS_WITH_PACKED)
    assert all(m._hf_paged_skinny_rows == rows and m._hf_paged_packed is not None for m in linears)
    # Batch 1: every decode step's matmuls take the C++ kernel. Same greedy tokens as unwrapped bf16.
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=12, do_sample=False), want)
    # Batch 3 (and the prompt): oneDNN with the packed weights, same tokens as unwrapped bf16 per row.
    batch = torch.tensor([[1, 5, 9, 12, 7, 30, 2, 200], [1, 8, 8, 40, 41, 42, 43, 44], [1, 3, 3, 3, 3, 3, 3, 3]])
    hf_paged.unwrap(model)
    want3 = model.generate(input_ids=batch, max_new_tokens=12, do_sample=False)
    hf_paged.wrap(model, num_blocks=32)
    assert torch.equal(model.generate(input_ids=batch, max_new_tokens=12, do_sample=False), want3)
    # Weights changed after wrap() (in place, or replaced): the packed copy follows them.
    layer = linears[0]
    x = torch.randn(4, layer.in_features).bfloat16()
    with torch.no_grad():
        layer.weight.mul_(2)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        layer.weight.data = torch.randn_like(layer.weight)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    hf_paged.unwrap(model)
    assert not any(hasattr(m, "_hf_paged_packed") for m in linears)
    monkeypatch.setenv("HF_PAGED_ONEDNN_PACK_BF16", "0")
    cpu_layers.install_cpu_linears(model)
    assert all(m._hf_paged_packed is None and m._hf_paged_skinny_rows == cpu_layers.BF16_SKINNY_MAX_ROWS[path]
               for m in linears)
    cpu_layers.remove_cpu_linears(model)
    monkeypatch.setenv("HF_PAGED_CPU_GEMM_BF16", "0")  # the forced fallback: transformers' F.linear
    assert cpu_layers.install_cpu_linears(model) == 0


# ------------------------------------------------------------------------------------------- RMSNorm
def _norm_modules(dim):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(dim)
    llama, gemma = LlamaRMSNorm(dim, eps=1e-5), GemmaRMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        llama.weight.normal_()
        gemma.weight.normal_()
    return llama, gemma


@pytest.mark.parametrize("shape", [(1, 576), (24, 576), (2, 5, 64), (3, 4, 7, 100), (7, 13)])
def test_rms_norm_matches_the_eager_modules(shape):
    llama, gemma = _norm_modules(shape[-1])
    x = torch.randn(*shape) * 4
    with torch.no_grad():
        torch.testing.assert_close(cpu.rms_norm(x, llama.weight, 1e-5), llama(x), rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(cpu.rms_norm(x, gemma.weight, 1e-6, 1.0), gemma(x), rtol=2e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="weight"):
        cpu.rms_norm(x, torch.ones(shape[-1] + 1), 1e-5)


def test_cpu_norms_install_verify_and_remove(monkeypatch):
    llama, gemma = _norm_modules(64)
    odd = type("OddRMSNorm", (torch.nn.Module,), {
        "forward": lambda self, x: x * self.weight})  # another formula: must be left alone
    model = torch.nn.ModuleList([llama, gemma, odd()])
    model[2].weight = torch.nn.Parameter(torch.ones(64))
    model[2].eps = 1e-6
    assert cpu_layers.install_cpu_norms(model) == 2
    assert (llama._hf_paged_norm_offset, gemma._hf_paged_norm_offset) == (0.0, 1.0)
    assert "forward" not in model[2].__dict__
    x = torch.randn(3, 64, requires_grad=True)
    calls = []
    real = torch.ops.hf_paged_cpu.rms_norm
    monkeypatch.setattr(torch.ops.hf_paged_cpu, "rms_norm", lambda *a: calls.append(1) or real(*a))
    llama(x).sum().backward()  # grad mode: the module's own ops, so gradients flow
    assert x.grad is not None and not calls
    with torch.no_grad():
        torch.testing.assert_close(llama(x), type(llama).forward(llama, x), rtol=2e-6, atol=1e-6)
    assert calls == [1]
    cpu_layers.remove_cpu_norms(model)
    assert not any("forward" in m.__dict__ or "_hf_paged_norm_offset" in m.__dict__ for m in model.modules())
    monkeypatch.setenv("HF_PAGED_CPU_NORM", "0")
    assert cpu_layers.install_cpu_norms(model) == 0
    assert cpu_layers.install_cpu_norms(torch.nn.ModuleList([_norm_modules(8)[0].double()])) == 0


def _bf16_norm_modules(dim):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    llama, gemma = _norm_modules(dim)
    qwen3 = Qwen3RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        qwen3.weight.normal_()
    return [m.bfloat16() for m in (llama, gemma, qwen3)]


@pytest.mark.parametrize("shape", [(1, 576), (24, 576), (2, 5, 64), (3, 4, 7, 100), (7, 13), (2, 2048)])
def test_rms_norm_bf16_matches_the_eager_modules_and_an_fp64_oracle(shape):
    llama, gemma, qwen3 = _bf16_norm_modules(shape[-1])
    x = (torch.randn(*shape) * 4).bfloat16()
    with torch.no_grad():
        for mod, offset, round_first in ((llama, 0.0, True), (gemma, 1.0, False), (qwen3, 0.0, True)):
            got = cpu.rms_norm_bf16(x, mod.weight, mod.variance_epsilon if hasattr(mod, "variance_epsilon")
                                    else mod.eps, offset, round_first=round_first)
            want = type(mod).forward(mod, x)
            assert got.dtype == torch.bfloat16 and got.shape == x.shape
            # Only the order of the sum of squares differs from the module: equal but for rare 1-ulp flips.
            assert int((got != want).sum()) * 200 <= x.numel()
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0)
            xd = x.double()
            eps = mod.variance_epsilon if hasattr(mod, "variance_epsilon") else mod.eps
            oracle = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * (mod.weight.double() + offset)
            # One or two roundings to bf16 (2**-8 relative each) away from the exact value.
            torch.testing.assert_close(got.double(), oracle, rtol=2 ** -7, atol=1e-6)
    with pytest.raises(RuntimeError, match="weight"):
        cpu.rms_norm_bf16(x, torch.ones(shape[-1] + 1, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu.rms_norm_bf16(x.float(), llama.weight, 1e-5)


def test_cpu_norms_bf16_pick_each_modules_variant(monkeypatch):
    llama, gemma, qwen3 = _bf16_norm_modules(576)
    odd = type("OddRMSNorm", (torch.nn.Module,), {
        "forward": lambda self, x: (x.float() * 2 * self.weight.float()).to(x.dtype)})  # another formula
    model = torch.nn.ModuleList([llama, gemma, qwen3, odd()])
    model[3].weight = torch.nn.Parameter(torch.ones(576, dtype=torch.bfloat16))
    model[3].eps = 1e-6
    assert cpu_layers.install_cpu_norms(model) == 3
    assert (llama._hf_paged_norm_offset, llama._hf_paged_norm_round_first) == (0.0, True)
    assert (gemma._hf_paged_norm_offset, gemma._hf_paged_norm_round_first) == (1.0, False)
    assert (qwen3._hf_paged_norm_offset, qwen3._hf_paged_norm_round_first) == (0.0, True)
    assert "forward" not in model[3].__dict__
    calls = []
    real = torch.ops.hf_paged_cpu.rms_norm_bf16
    monkeypatch.setattr(torch.ops.hf_paged_cpu, "rms_norm_bf16", lambda *a: calls.append(1) or real(*a))
    x = (torch.randn(40, 576) * 3).bfloat16()
    with torch.no_grad():
        for mod in (llama, gemma, qwen3):
            want = type(mod).forward(mod, x)
            assert int((mod(x) != want).sum()) * 200 <= x.numel()
        assert calls == [1, 1, 1]
        assert torch.equal(llama(x.float()), type(llama).forward(llama, x.float()))  # fp32 input: the module's ops
    assert calls == [1, 1, 1]
    cpu_layers.remove_cpu_norms(model)
    assert not any("_hf_paged_norm_round_first" in m.__dict__ for m in model.modules())
    monkeypatch.setenv("HF_PAGED_CPU_NORM", "0")  # the forced fallback: transformers' own ops
    assert cpu_layers.install_cpu_norms(model) == 0


def test_bf16_wide_output_layer_takes_the_packed_weights_from_one_row():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    wide = torch.nn.Linear(64, cpu_layers.BF16_PACKED_ONE_ROW_MIN_OUT, bias=False).bfloat16()
    narrow = torch.nn.Linear(64, 96).bfloat16()
    model = torch.nn.ModuleList([wide, narrow])
    assert cpu_layers.install_cpu_linears(model) == 2
    assert wide._hf_paged_packed is not None and wide._hf_paged_skinny_rows == 0
    assert narrow._hf_paged_skinny_rows == min(cpu_layers.BF16_SKINNY_MAX_ROWS[cpu.bf16_linear_path()],
                                               cpu_layers.BF16_SKINNY_ROWS_WITH_PACKED)
    x = torch.randn(1, 64).bfloat16()
    with torch.no_grad():
        for layer in (wide, narrow):
            want = x.double() @ layer.weight.double().T + (layer.bias.double() if layer.bias is not None else 0)
            torch.testing.assert_close(layer(x).double(), want, rtol=2 ** -7, atol=1e-3)
    cpu_layers.remove_cpu_linears(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_write_kv_matches_reference(dtype, slot_dtype):
    gen = torch.Generator().manual_seed(1)
    kc = torch.zeros(6, 4, 2, 8, dtype=dtype)
    vc = torch.zeros_like(kc)
    # Strided rows, as attention hands them over: [B=1, KVH, T, D] transposed to [T, KVH, D].
    key = torch.randn(1, 2, 5, 8, generator=gen).to(dtype).transpose(1, 2)[0]
    value = torch.randn(1, 2, 5, 8, generator=gen).to(dtype).transpose(1, 2)[0]
    slots = torch.tensor([3, -1, 17, 0, 23], dtype=slot_dtype)
    cpu.write_kv(key, value, kc, vc, slots)
    rk, rv = torch.zeros_like(kc), torch.zeros_like(vc)
    reference.write_kv(key, value, rk, rv, slots)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu.write_kv(key, value, kc, vc, torch.tensor([0, 1, 2, 3, 24], dtype=slot_dtype))


def test_decode_rejects_block_ids_outside_the_cache():
    batch = make_batch([20], [1], heads=2, kv_heads=1, head_dim=8, block_size=16, dtype=torch.float32,
                       spare_blocks=0)
    q, kc, vc, tables, cu, lens = batch.args()
    bad = tables.clone()
    bad[0, 1] = kc.shape[0]  # one past the last block
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu.paged_decode(q, kc, vc, bad, cu, lens, torch.zeros_like(q), scale=1.0)
    with pytest.raises(RuntimeError, match="block table holds"):
        cpu.paged_decode(q, kc, vc, tables[:, :1], cu, torch.tensor([40], dtype=torch.int32),
                         torch.zeros_like(q), scale=1.0)


@pytest.mark.parametrize("width", [1, 7, 33, 64, 1000, 49152])
def test_argmax_rows_equals_torch_argmax(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(37, width, generator=g)
    ties = torch.randint(-2, 2, (37, width), generator=g).float()  # many ties: the first index wins
    for t in (x, ties, -ties):
        assert torch.equal(cpu.argmax_rows(t), t.argmax(-1))
    odd = x.clone()
    odd[3] = float("-inf")
    odd[4, width // 2] = float("nan")  # torch and numpy pick the (first) NaN
    odd[5, -1] = float("nan")
    odd[6] = -0.0
    odd[6, width - 1] = 0.0
    assert torch.equal(cpu.argmax_rows(odd), odd.argmax(-1))
    wide = torch.randn(5, width + 9, generator=g)[:, 3 : 3 + width]  # rows with a larger stride
    assert torch.equal(cpu.argmax_rows(wide), wide.argmax(-1))


@pytest.mark.parametrize("width", [1, 7, 33, 1000, 49152])
def test_argmax_logprob_rows_equals_log_softmax(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(37, width, generator=g) * 4
    x[1] = torch.randint(-2, 2, (width,), generator=g).float()  # ties: the first index, as argmax
    x[2, :width // 2 + 1] = float("-inf")  # masked-out tokens count for nothing
    x[7] += 1000.0  # large logits: exp is taken after subtracting the maximum
    wide = torch.randn(5, width + 9, generator=g)[:, 3 : 3 + width]  # rows with a larger stride
    for t in (x, wide):
        ids, lps = cpu.argmax_logprob_rows(t)
        assert torch.equal(ids, t.argmax(-1))
        ref = torch.log_softmax(t, -1).gather(1, ids.view(-1, 1)).view(-1)
        torch.testing.assert_close(lps, ref, atol=2e-5, rtol=1e-5, equal_nan=True)  # width 1: row 2 is all -inf
    odd = torch.randn(4, width, generator=g)
    odd[0] = float("-inf")
    odd[1, width // 2] = float("nan")
    odd[2, 0] = float("inf")
    ids, lps = cpu.argmax_logprob_rows(odd)
    assert torch.equal(ids, odd.argmax(-1))
    ref = torch.log_softmax(odd, -1).gather(1, ids.view(-1, 1)).view(-1)
    assert lps[:3].isnan().all() and ref[:3].isnan().all()  # as log_softmax: a non-finite maximum gives NaN
    torch.testing.assert_close(lps[3:], ref[3:], atol=2e-5, rtol=1e-5)


def test_argmax_rows_refuses_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="float32"):
        cpu.argmax_rows(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu.argmax_rows(torch.zeros(3, 2).t())
    with pytest.raises(RuntimeError, match="empty"):
        cpu.argmax_rows(torch.zeros(2, 0))
    with pytest.raises(RuntimeError, match="argmax_logprob_rows: a 2-D float32"):
        cpu.argmax_logprob_rows(torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu.argmax_logprob_rows(torch.zeros(3, 2).t())


def test_greedy_sampler_uses_the_kernel_with_torch_ties(monkeypatch):
    from hf_paged.engine.params import SamplingParams
    from hf_paged.engine.sampler import Sampler, SamplingRow

    calls = []
    real = cpu.argmax_rows
    monkeypatch.setattr(cpu, "argmax_rows", lambda scores: calls.append(scores.shape) or real(scores))
    logits = torch.randint(-3, 3, (64, 4096), generator=torch.Generator().manual_seed(0)).float()
    rows = [SamplingRow(SamplingParams(max_new_tokens=4), [1], 0) for _ in range(64)]
    assert Sampler(4096).sample(logits, rows).tokens == logits.argmax(-1).tolist()
    assert calls == [(64, 4096)]


def test_greedy_logprobs_come_from_the_kernel_and_match_the_general_path(monkeypatch):
    """Greedy rows that ask for logprobs (every TGI stream) take argmax_logprob_rows: one call, the same
    tokens and logprobs as the log_softmax path, which still serves the rows that want top lists."""
    from hf_paged.engine import sampler as sampler_mod
    from hf_paged.engine.params import SamplingParams
    from hf_paged.engine.sampler import LOGPROB_FLOOR, Sampler, SamplingRow

    calls = []
    real = cpu.argmax_logprob_rows
    monkeypatch.setattr(cpu, "argmax_logprob_rows", lambda scores: calls.append(scores.shape) or real(scores))
    logits = torch.randn(40, 4096, generator=torch.Generator().manual_seed(1)) * 5
    logits[3] = float("nan")
    kinds = [dict(logprobs=True), dict(logprobs=True, top_logprobs=3), dict()]
    rows = [SamplingRow(SamplingParams(max_new_tokens=4, **kinds[i % 3]), [1], 0) for i in range(40)]
    got = Sampler(4096).sample(logits, rows)
    assert calls == [(40, 4096)]
    monkeypatch.setattr(sampler_mod, "_argmax_logprob", lambda scores: None)  # the general path
    want = Sampler(4096).sample(logits, rows)
    assert got.tokens == want.tokens == logits.argmax(-1).tolist()
    assert got.logprobs[3] == want.logprobs[3] == LOGPROB_FLOOR
    for i in range(40):
        if i % 3 == 2:
            assert got.logprobs[i] is None and got.top_logprobs[i] == []
        else:
            assert got.logprobs[i] == pytest.approx(want.logprobs[i], abs=2e-5)
            assert [t for t, _ in got.top_logprobs[i]] == [t for t, _ in want.top_logprobs[i]]


def test_a_build_killed_midway_does_not_block_later_ones():
    """torch's build lock is a plain file, removed only when its builder ends normally; a start killed while the
    kernel compiled left it, and every later start waited on it forever."""
    import os
    import threading

    from torch.utils import cpp_extension

    if not cpu.available():
        pytest.skip("the C++ CPU kernel did not build here")
    name = f"hf_paged_cpu_{cpu._host_key()}"
    stale = os.path.join(cpp_extension._get_build_directory(name, False), "lock")
    open(stale, "w").close()  # what a killed build leaves
    done = threading.Event()
    threading.Thread(target=lambda: (cpu._build(), done.set()), daemon=True).start()
    assert done.wait(120), "the build waited on a stale lock"
    assert not os.path.exists(stale)
