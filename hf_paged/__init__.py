"""hf_paged: paged KV cache, Triton attention kernels and continuous batching for HF transformers.

Example::

    import hf_paged
    model, tok = hf_paged.load_default_model()
    model = hf_paged.wrap(model, kv_memory="1GiB")
    out = model.generate(**tok(["Hello"], return_tensors="pt"), max_new_tokens=32)
"""
from __future__ import annotations

from .config import EngineConfig
from .kv.blocks import BlockAllocator, BlockTable, KVCacheFullError
from .kv.cache import PagedKVCache
from .kv.pool import KVPool
from .wrap import SUPPORTED_MODEL_TYPES, UnsupportedModelError, is_wrapped, kv_pool, unwrap, wrap
from .engine.outputs import CompletionOutput, FinishReason, RequestOutput, StreamEvent
from .engine.params import SamplingParams
from .engine.pipeline import PagedPipeline
from .engine.stats import EngineStats
from .engine.text_pipeline import TextGenerationPipeline, pipeline

__version__ = "0.1.0"


def load_default_model(*args, **kwargs):
    """SmolLM2-135M-Instruct and its tokenizer, offline (see :mod:`hf_paged.models`)."""
    from .models import load_default_model as _load

    return _load(*args, **kwargs)


__all__ = [
    "wrap", "unwrap", "is_wrapped", "kv_pool", "PagedKVCache", "KVPool", "BlockAllocator", "BlockTable",
    "KVCacheFullError", "UnsupportedModelError", "SUPPORTED_MODEL_TYPES", "load_default_model",
    "PagedPipeline", "pipeline", "TextGenerationPipeline", "SamplingParams", "RequestOutput",
    "CompletionOutput", "StreamEvent", "FinishReason", "EngineConfig", "EngineStats",
]
