"""``hf_paged.pipeline("text-generation", ...)``: transformers.pipeline's inputs and outputs, paged engine.

The call takes what transformers' ``TextGenerationPipeline`` takes (its own parameters, then generation
parameters) and returns the same records: the generated tokens decoded alone, as it decodes them (a stop
string included), after the prompt text or the chat for ``return_full_text``. Generation parameters given to
``pipeline()`` apply to every call, under the call's own; transformers' pipeline defaults (256 new tokens,
sampling at temperature 0.7) fill what neither they nor the model's generation config set.

Example::

    gen = hf_paged.pipeline("text-generation", model="path/to/model")
    gen("Once upon a time", max_new_tokens=20)          # [{"generated_text": "Once upon a time..."}]
    gen([{"role": "user", "content": "Hi"}])            # [{"generated_text": [..., {"role": "assistant", ...}]}]
"""
from __future__ import annotations

import collections
import enum
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from ..config import EngineConfig
from .pipeline import PagedPipeline

# transformers' TextGenerationPipeline defaults, for what neither the call nor the model's config sets; the
# sampling ones only when sampling.
_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
_SAMPLING = {"temperature", "top_k", "top_p", "min_p", "typical_p"}
_CALL_PARAMS = {"return_full_text", "return_tensors", "return_text", "return_type", "clean_up_tokenization_spaces",
                "skip_special_tokens", "prefix", "handle_long_generation", "stop_sequence", "continue_final_message",
                "add_special_tokens", "tools", "batch_size"}
_UNSUPPORTED = ("documents", "truncation", "padding", "tokenizer_encode_kwargs", "assistant_model",
                "assistant_tokenizer")


class ReturnType(enum.Enum):
    TENSORS = 0
    NEW_TEXT = 1
    FULL_TEXT = 2


def _is_lazy(x: Any) -> bool:
    """Inputs transformers' pipelines consume lazily (and answer with an iterator): generators, torch datasets."""
    return isinstance(x, (types.GeneratorType, Dataset))


def _is_chat(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) for m in x)


class TextGenerationPipeline:
    """Callable like transformers' ``TextGenerationPipeline``; runs on a :class:`PagedPipeline`.
    ``defaults``: keyword arguments for every call (a call's own win over them)."""

    task = "text-generation"

    def __init__(self, engine: PagedPipeline, **defaults: Any) -> None:
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self._defaults = defaults

    def __call__(self, text_inputs, **kwargs):
        if kwargs.get("generation_config") is not None:  # it replaces the pipeline's generation parameters
            kwargs = {**{k: v for k, v in self._defaults.items() if k in _CALL_PARAMS}, **kwargs}
        else:
            kwargs = {**self._defaults, **kwargs}
        return self._call(text_inputs, **kwargs)

    def _call(self, text_inputs, *, return_full_text: bool | None = None, return_tensors: bool | None = None,
              return_text: bool | None = None, return_type: ReturnType | None = None,
              clean_up_tokenization_spaces: bool | None = None, skip_special_tokens: bool | None = None,
              prefix: str | None = None, handle_long_generation: str | None = None,
              stop_sequence: str | list[str] | None = None, continue_final_message: bool | None = None,
              add_special_tokens: bool | None = None, tools: list[dict] | None = None,
              batch_size: int | None = None, **generate_kwargs):
        for name in _UNSUPPORTED:
            if generate_kwargs.get(name) is not None:
                raise ValueError(f"{name}: not supported by hf_paged.pipeline")
        if handle_long_generation not in (None, "hole"):
            raise ValueError(f"handle_long_generation: expected None or 'hole', got {handle_long_generation!r}")
        kind = _return_type(return_full_text, return_tensors, return_text, return_type)
        kwargs = self._kwargs(generate_kwargs)
        if stop_sequence is not None:
            kwargs["stop_strings"] = stop_sequence
        decode = dict(skip_special_tokens=True if skip_special_tokens is None else skip_special_tokens)
        if clean_up_tokenization_spaces is not None:
            decode["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces

        def encode(prompt) -> tuple[list[int], bool]:
            cont = continue_final_message
            if _is_chat(prompt) and cont is None:  # a final assistant message is a prefill to continue
                cont = prompt[-1].get("role") == "assistant"
            return self._encode(prompt, prefix, add_special_tokens, tools, bool(cont), handle_long_generation,
                                kwargs), bool(cont)

        def records(prompt, res, cont: bool) -> list[dict]:
            return self._records(prompt, res, kind, cont, decode)

        if _is_lazy(text_inputs) and self.engine.tp is None:
            # As transformers does for generators and datasets: an iterator, consumed as it is read. (Under tensor
            # parallelism every rank takes the list path: its generate() is what the ranks run together.)
            return self._iterate(text_inputs, encode, records, kwargs, prefix)
        single = isinstance(text_inputs, str) or _is_chat(text_inputs)
        batch = [text_inputs] if single else list(text_inputs)
        encoded = [encode(prompt) for prompt in batch]  # every prompt is checked before any runs
        results = self._generate_all([ids for ids, _ in encoded], kwargs, prefix)
        out = [records(prompt, res, cont) for prompt, res, (_, cont) in zip(batch, results, encoded)]
        return out[0] if single else out

    def _iterate(self, inputs, encode, records, kwargs: dict, prefix: str | None) -> Iterator[list[dict]]:
        """Records of each input in order, while later inputs run: up to twice ``max_num_seqs`` requests are
        in flight, so the engine's batch stays full. Leaving the loop early cancels the ones in flight."""
        window = 2 * self.engine.config.max_num_seqs
        if isinstance(inputs, Dataset) and not isinstance(inputs, IterableDataset):
            items = (inputs[i] for i in range(len(inputs)))  # a map-style dataset: by index, as its sampler reads it
        else:
            items = iter(inputs)
        flight: collections.deque = collections.deque()
        try:
            for prompt in items:
                ids, cont = encode(prompt)
                flight.append((prompt, self._submit(ids, kwargs, prefix), cont))
                while len(flight) >= window:
                    prompt, handle, cont = flight.popleft()
                    yield records(prompt, handle.result(), cont)
            while flight:
                prompt, handle, cont = flight.popleft()
                yield records(prompt, handle.result(), cont)
        finally:
            for _, handle, _ in flight:
                handle.cancel()

    # ------------------------------------------------------------------ internals
    def _kwargs(self, call: dict) -> dict:
        """The generation kwargs, plus transformers' pipeline defaults for what nobody set."""
        kwargs = {k: v for k, v in call.items() if v is not None}
        config = self.model.generation_config
        given = kwargs.get("generation_config")
        set_params = {**(config.to_diff_dict() if config is not None else {}),
                      **(given.to_diff_dict() if given is not None else {}), **kwargs}
        added = {k: v for k, v in _DEFAULTS.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in _SAMPLING}
        return {**kwargs, **added}

    def _encode(self, prompt, prefix, add_special_tokens, tools, cont: bool, hole, kwargs: dict) -> list[int]:
        if isinstance(prompt, str):
            if prefix and isinstance(prefix, str):
                prompt = prefix + prompt
            extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            ids = list(self.tokenizer(prompt, **extra)["input_ids"]) if prompt else []
            if not ids:  # as generate() without input ids: from the BOS token
                bos = getattr(self.model.generation_config, "bos_token_id", None)
                if bos is None:
                    raise ValueError("prompt: empty, and the model's generation config has no bos_token_id to "
                                     "start from")
                ids = [bos]
        else:
            ids = self.engine.encode(prompt, tools=tools, continue_final_message=cont)
        if hole == "hole":  # keep the prompt's end, so that it and the new tokens fit the model's context
            new = kwargs.get("max_new_tokens")
            if new is None:
                new = kwargs.get("max_length", 0) - len(ids)
                if new < 0:
                    raise ValueError("handle_long_generation: cannot tell how many new tokens are expected")
            keep = self.engine.max_model_len - new
            if keep <= 0:
                raise ValueError("handle_long_generation='hole': the new tokens alone exceed the model's context")
            ids = ids[-keep:]
        return ids

    def _length_kwargs(self, ids: list[int], kwargs: dict, prefix: str | None) -> dict:
        """A total max_length/min_length does not count the prefix (transformers adds its length to them)."""
        if not prefix or not isinstance(prefix, str):
            return kwargs
        extra = len(self.tokenizer(prefix, add_special_tokens=False)["input_ids"])
        return {k: (v + extra if k in ("max_length", "min_length") else v) for k, v in kwargs.items()}

    def _submit(self, ids: list[int], kwargs: dict, prefix: str | None):
        req = self.engine._make_request(ids, self._length_kwargs(ids, kwargs, prefix))
        req.quiet = True  # only its result is read
        return self.engine._enqueue([req])[0]

    def _generate_all(self, ids: list[list[int]], kwargs: dict, prefix: str | None):
        if prefix or any(k in kwargs for k in ("max_length", "min_length")):  # lengths per prompt
            handles = [self._submit(i, kwargs, prefix) for i in ids]
            return [h.result() for h in handles]
        return self.engine.generate(ids, progress=False, **kwargs)

    def _records(self, prompt, res, kind: ReturnType, cont: bool, decode: dict) -> list[dict]:
        records = []
        for o in res.outputs:
            if kind is ReturnType.TENSORS:
                records.append({"generated_token_ids": res.prompt_token_ids + o.token_ids})
                continue
            # As transformers decodes it: the new tokens alone, through to the one that completed a stop string.
            text = self.tokenizer.decode(o.token_ids, **decode)
            if kind is ReturnType.NEW_TEXT:
                generated: Any = text
            elif _is_chat(prompt):
                if cont:  # the assistant's prefilled message, continued
                    generated = list(prompt[:-1]) + [dict(prompt[-1], content=prompt[-1]["content"] + text)]
                else:
                    generated = list(prompt) + [{"role": "assistant", "content": text}]
            elif isinstance(prompt, str):
                generated = prompt + text
            else:
                generated = text
            records.append({"generated_text": generated})
        return records

    def close(self) -> None:
        self.engine.close()


def _return_type(full: bool | None, tensors: bool | None, text: bool | None, kind: ReturnType | None) -> ReturnType:
    """transformers' resolution of the return flags, with its errors for flags that exclude each other."""
    if kind is not None:
        return kind
    if full is not None:
        if text is not None:
            raise ValueError("`return_text` is mutually exclusive with `return_full_text`")
        if tensors is not None:
            raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
        return ReturnType.FULL_TEXT if full else ReturnType.NEW_TEXT
    if tensors is not None:
        if text is not None:
            raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
        return ReturnType.TENSORS
    return ReturnType.FULL_TEXT


def pipeline(task: str = "text-generation", model: Any = None, tokenizer: Any = None, *,
             dtype: torch.dtype | str | None = None, device: Any = None, device_map: Any = None,
             **kwargs) -> TextGenerationPipeline:
    """Drop-in for ``transformers.pipeline("text-generation", ...)`` backed by the paged engine.

    ``model`` is a local folder, ``"default"``/None (SmolLM2-135M-Instruct) or a loaded model; engine options
    (:class:`~hf_paged.config.EngineConfig` fields: ``kv_memory``, ``max_num_seqs``, ...) pass through, and
    the other keyword arguments are generation parameters for every call (``max_new_tokens``, ``do_sample``,
    ...). ``device=-1`` is the CPU, as in transformers; ``torch_dtype`` is ``dtype``'s old name.
    """
    if task != "text-generation":
        raise ValueError(f"task: only 'text-generation' is supported, got {task!r}")
    from ..models import load_model
    from .params import SamplingParams

    if dtype is None:
        dtype = kwargs.pop("torch_dtype", None)
    for ignored in ("batch_size", "num_workers", "trust_remote_code"):
        kwargs.pop(ignored, None)
    if isinstance(device, int) and not isinstance(device, bool) and device < 0:
        device = "cpu"
    engine_names = set(EngineConfig.names())
    generation = {k: v for k, v in kwargs.items() if k not in engine_names}
    config = EngineConfig.from_kwargs(**{k: v for k, v in kwargs.items() if k in engine_names})
    # Unknown names fail here, before loading anything (None values are not read, only their names).
    SamplingParams.from_request(None, **{k: None for k in generation if k not in _CALL_PARAMS | set(_UNSUPPORTED)
                                         and k != "generation_config"})
    m, tok = load_model(model, tokenizer=tokenizer, dtype=dtype, device=device, device_map=device_map)
    return TextGenerationPipeline(PagedPipeline(m, tok, config=config), **generation)
