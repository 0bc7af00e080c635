"""A few scenarios of tests/engine_fuzz.py (random requests, random engine shapes, the same outputs, every
block freed; greedy requests against HF generate()); ``python tests/engine_fuzz.py --seeds N`` runs many more."""
from __future__ import annotations

import pytest
from engine_fuzz import LoraTarget, scenario
from fuzz_models import chat_model
from tiny_models import build, load


@pytest.mark.parametrize("arch,seeds", [("llama", range(0, 4)), ("gpt2", range(4, 6)), ("gemma2", range(6, 8)),
                                        ("lora", range(8, 9)), ("chat", (5, 22))])
def test_random_requests_give_the_same_outputs_on_every_engine_shape(tiny_root, tmp_path, arch, seeds):
    tok = None
    if arch == "lora":
        pytest.importorskip("peft")
        model = LoraTarget(tmp_path)
    elif arch == "chat":  # the default model's tokenizer: real text, and constraints (seeds 5 and 22 have four each,
        pytest.importorskip("xgrammar")  # one that cannot be completed among them)
        model, tok = chat_model()
    else:
        model = load(build(arch, tiny_root))
    problems = [p for seed in seeds for p in scenario(model, seed, tok=tok)]
    assert not problems, "\n".join(problems[:10])
