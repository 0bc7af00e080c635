"""A PEFT PeftModel (LoRA) wrapped by hf_paged: generate() equals the unwrapped PeftModel token for
token, with one adapter active and after set_adapter, and PagedPipeline runs it too."""
from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, build, load

import hf_paged

peft = pytest.importorskip("peft")


@pytest.fixture(params=["llama", "qwen2"])
def peft_model(tiny_root, request):
    base = load(build(request.param, tiny_root))
    first = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"],
                            init_lora_weights=False)
    model = peft.get_peft_model(base, first).eval()
    model.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"],
                                                init_lora_weights=False))
    yield model
    hf_paged.unwrap(model)


def test_wrapped_peft_model_generates_like_the_unwrapped_one(peft_model):
    ids = torch.tensor([[1, 5, 9, 12, 7], [0, 1, 3, 3, 8]])  # left-padded, as generate() wants
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    refs = {}
    for name in ("default", "second"):
        peft_model.set_adapter(name)
        refs[name] = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert not torch.equal(refs["default"], refs["second"])  # the adapters matter
    assert hf_paged.wrap(peft_model, num_blocks=64) is peft_model and hf_paged.is_wrapped(peft_model)
    for name in ("second", "default"):
        peft_model.set_adapter(name)
        out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        assert torch.equal(out, refs[name]), name
    # Seeded sampling too: the same logits give the same draws from the same global generator.
    torch.manual_seed(3)
    sampled = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=0)
    hf_paged.unwrap(peft_model)
    torch.manual_seed(3)
    assert torch.equal(peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                                           top_k=0), sampled)
    with hf_paged.PagedPipeline(peft_model, IdTokenizer(), num_blocks=64) as pipe:
        got = pipe.generate([1, 5, 9, 12, 7], max_new_tokens=12, do_sample=False, ignore_eos=True, adapter="default")
    assert got.token_ids == refs["default"][0, 5:].tolist()


def test_prompt_learning_is_refused(tiny_root):
    base = load(build("llama", tiny_root))
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(hf_paged.UnsupportedModelError, match="prompt-learning"):
        hf_paged.wrap(model, num_blocks=16)
