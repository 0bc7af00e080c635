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
