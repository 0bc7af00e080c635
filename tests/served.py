"""Helpers of the server tests: a uvicorn server in a thread, a fast chat model, metrics reading."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers as tf
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from hf_paged.engine.pipeline import PagedPipeline
from hf_paged.models import _load_tokenizer, ensure_default_model


class Served:
    """A uvicorn server on a free port, in a background thread."""

    def __init__(self, app, graceful: float | None = None, drain: float | None = None) -> None:
        """uvicorn's own server with ``graceful``; with ``drain``, hf-paged serve's (DrainingServer)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.url = f"http://127.0.0.1:{self.port}"
        if drain is not None:
            from hf_paged.server.serving import DrainingServer

            self.server = DrainingServer(app, drain=drain, host="127.0.0.1", port=self.port, log_level="warning")
        else:
            self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                        timeout_graceful_shutdown=graceful))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    @property
    def state(self):
        return self.app.state.hf_paged

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def serving(pipe, **app_options) -> Iterator[Served]:
    """``pipe`` behind a fresh app (no UI, the pipeline left open) on a uvicorn server, for a test module."""
    from hf_paged.server import create_app

    srv = Served(create_app(pipe, model_id="tiny", ui=False, close_pipeline=False, **app_options))
    try:
        yield srv
    finally:
        srv.stop()
        wait_idle(pipe)


def wait_idle(pipe, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = pipe.stats()
        if s["blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0:
            return s
        assert time.monotonic() < deadline, f"engine not idle: {s}"
        time.sleep(0.05)


def tiny_chat_pipeline(max_model_len: int = 128, **kwargs) -> PagedPipeline:
    """A 2-layer random Llama with the default model's tokenizer and chat template: real text in and out,
    a few milliseconds per step (for tests that send hundreds of requests)."""
    tok = _load_tokenizer(ensure_default_model())
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_model_len,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = tf.LlamaForCausalLM(cfg).eval()
    return PagedPipeline(model, tok, **{"kv_memory": "32MiB", "max_num_seqs": 32, **kwargs})


def save_tiny_chat_model(path) -> None:
    """:func:`tiny_chat_pipeline`'s model and tokenizer as a model folder (for servers in other processes)."""
    pipe = tiny_chat_pipeline()
    pipe.model.save_pretrained(path)
    pipe.tokenizer.save_pretrained(path)
    pipe.close()


LABELS = ("validation", "overloaded", "generation", "incomplete", "cancelled", "internal", "unhealthy")


def failures(state) -> dict[str, float]:
    """``tgi_request_failure`` counts by label, read from the app's own counters."""
    return {label: state.metrics.count("tgi_request_failure", label) for label in LABELS}


def metric_samples(text: str) -> dict:
    return {(s.name, s.labels.get("err")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
