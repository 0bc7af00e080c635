"""``hf_paged.pipeline("text-generation", ...)``: transformers.pipeline's inputs and outputs, paged engine.

Example::

    gen = hf_paged.pipeline("text-generation", model="path/to/model")
    gen("Once upon a time", max_new_tokens=20)          # [{"generated_text": "Once upon a time..."}]
    gen([{"role": "user", "content": "Hi"}])            # [{"generated_text": [..., {"role": "assistant", ...}]}]
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import EngineConfig
from .pipeline import PagedPipeline


def _is_chat(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) for m in x)


class TextGenerationPipeline:
    """Callable like transformers' ``TextGenerationPipeline``; runs on a :class:`PagedPipeline`."""

    task = "text-generation"

    def __init__(self, engine: PagedPipeline) -> None:
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer

    def __call__(self, text_inputs, *, return_full_text: bool = True, return_tensors: bool = False,
                 return_text: bool = True, stop_sequence: str | list[str] | None = None, **generate_kwargs):
        single = isinstance(text_inputs, str) or _is_chat(text_inputs)
        batch = [text_inputs] if single else list(text_inputs)
        if stop_sequence is not None:
            generate_kwargs.setdefault("stop_strings", stop_sequence)
        results = self.engine.generate(batch, progress=False, **generate_kwargs)
        out = [self._records(prompt, res, return_full_text, return_tensors, return_text)
               for prompt, res in zip(batch, results)]
        return out[0] if single else out

    @staticmethod
    def _records(prompt, res, full: bool, tensors: bool, text: bool) -> list[dict]:
        records = []
        for o in res.outputs:
            if tensors:
                records.append({"generated_token_ids": res.prompt_token_ids + o.token_ids})
                continue
            if not text:
                continue
            if _is_chat(prompt):
                if not full:
                    generated: Any = o.text
                elif prompt[-1].get("role") == "assistant":  # continue the assistant's prefilled message
                    last = dict(prompt[-1], content=prompt[-1]["content"] + o.text)
                    generated = list(prompt[:-1]) + [last]
                else:
                    generated = list(prompt) + [{"role": "assistant", "content": o.text}]
            elif isinstance(prompt, str) and full:
                generated = prompt + o.text
            else:
                generated = o.text
            records.append({"generated_text": generated})
        return records

    def close(self) -> None:
        self.engine.close()


def pipeline(task: str = "text-generation", model: Any = None, tokenizer: Any = None, *,
             dtype: torch.dtype | str | None = None, device: Any = None, device_map: Any = None,
             **kwargs) -> TextGenerationPipeline:
    """Drop-in for ``transformers.pipeline("text-generation", ...)`` backed by the paged engine.

    ``model`` is a local folder, ``"default"``/None (SmolLM2-135M-Instruct) or a loaded model;
    engine options (:class:`~hf_paged.config.EngineConfig` fields: ``kv_memory``, ``max_num_seqs``, ...)
    pass through.
    """
    if task != "text-generation":
        raise ValueError(f"task: only 'text-generation' is supported, got {task!r}")
    from ..models import load_model

    config = EngineConfig.from_kwargs(**kwargs)  # unknown options fail here, before loading anything
    m, tok = load_model(model, tokenizer=tokenizer, dtype=dtype, device=device, device_map=device_map)
    return TextGenerationPipeline(PagedPipeline(m, tok, config=config))
