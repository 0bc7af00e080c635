"""LoRA adapters over HTTP, with real clients: TGI's ``parameters.adapter_id`` (huggingface_hub's
InferenceClient), OpenAI's ``model`` (the openai client), ``/v1/models`` listing the adapters, the 422
for an unknown adapter, and ``--lora-adapters`` on the command line."""
from __future__ import annotations

import argparse

import httpx
import pytest
import torch
from served import failures, serving, tiny_chat_pipeline

from hf_paged.config import from_cli
from hf_paged.server.__main__ import add_arguments

peft = pytest.importorskip("peft")
openai = pytest.importorskip("openai")

GREEDY = dict(max_new_tokens=12, do_sample=False, ignore_eos=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pipe = tiny_chat_pipeline()
    root = tmp_path_factory.mktemp("server_adapters")
    dirs = {}
    for i, (name, targets) in enumerate({"sql": ["q_proj", "v_proj"], "poet": ["gate_proj", "down_proj"]}.items()):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=8, lora_alpha=32, target_modules=targets, init_lora_weights=False)
        peft.get_peft_model(type(pipe.model)(pipe.model.config), cfg).save_pretrained(root / name)
        dirs[name] = str(root / name)
    for name, path in dirs.items():
        pipe.load_adapter(name, path)
    with serving(pipe) as srv:
        yield srv, pipe, dirs
    pipe.close()


def test_tgi_adapter_id_runs_that_adapter(served):
    from huggingface_hub import InferenceClient

    srv, pipe, _ = served
    client = InferenceClient(base_url=srv.url)
    texts = {}
    for adapter in (None, "sql", "poet"):
        want = pipe.generate("Tell me about", adapter=adapter, **GREEDY).text
        got = client.text_generation("Tell me about", adapter_id=adapter, max_new_tokens=12,
                                      return_full_text=False)
        assert got == want, adapter
        texts[adapter] = got
    assert len(set(texts.values())) == 3  # each adapter answers differently
    # The base model's own id is the base model, as in TGI.
    assert client.text_generation("Tell me about", adapter_id="tiny", max_new_tokens=12,
                                  return_full_text=False) == texts[None]


def test_openai_model_picks_the_adapter_and_other_names_run_the_base(served):
    srv, pipe, _ = served
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Write a query"}]
    for model, adapter in (("sql", "sql"), ("poet", "poet"), ("tgi", None), ("tiny", None)):
        want = pipe.generate(messages, adapter=adapter, **GREEDY).text
        got = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        assert got.choices[0].message.content == want, model
        assert got.model == model
        comp = client.completions.create(model=model, prompt="Write a query", max_tokens=12, temperature=0)
        assert comp.choices[0].text == pipe.generate("Write a query", adapter=adapter, **GREEDY).text, model


def test_models_lists_the_base_and_each_adapter(served):
    srv, _, dirs = served
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "sql", "poet"}
    assert cards["sql"].parent == "tiny" and cards["sql"].root == dirs["sql"]
    assert getattr(cards["tiny"], "parent", None) is None


def test_an_unknown_adapter_id_is_a_422_naming_the_loaded_ones(served):
    srv, pipe, _ = served
    before = failures(srv.state)["validation"]
    for route in ("/generate", "/generate_stream"):
        r = httpx.post(srv.url + route, json={"inputs": "hi", "parameters": {"adapter_id": "nope"}})
        assert r.status_code == 422, r.text
        assert r.json() == {"error": "Input validation error: `adapter_id` 'nope' is not loaded; "
                                     "loaded adapters: 'sql', 'poet'", "error_type": "validation"}
    assert failures(srv.state)["validation"] == before + 2
    assert srv.state.in_flight == 0 and pipe.stats()["blocks_used"] == 0


def test_cli_takes_lora_adapters():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--lora-adapters", "sql=/a/sql, poet=/a/poet", "--max-lora-rank", "16"])
    cfg = from_cli(args)
    assert cfg.lora_adapters == {"sql": "/a/sql", "poet": "/a/poet"} and cfg.max_lora_rank == 16
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-adapters", "sql"])
