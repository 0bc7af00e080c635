"""``wrap(model)`` / ``unwrap(model)``: install paged KV storage into an unmodified HF decoder model.

Wrapping (1) registers the ``hf_paged`` attention and mask functions and switches the model to them,
(2) allocates one :class:`KVPool` sized from ``kv_memory`` or ``num_blocks``, (3) adds a forward
pre-hook that plans each forward's KV slots into a :class:`PagedKVCache` and hands the attention
layers a ``paged_metadata`` kwarg, (4) makes ``model.generate`` use a fresh paged cache per call
and give its blocks back when it returns, and (5) on CPU, reroutes the ``nn.Linear`` and RMSNorm
forwards to the C++ kernels (:mod:`hf_paged.kernels.cpu_layers`).

Example::

    model = hf_paged.wrap(AutoModelForCausalLM.from_pretrained(path), kv_memory="1GiB")
    out = model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=64)
"""
from __future__ import annotations

import functools
import inspect
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from . import attention
from .config import EngineConfig
from .kv.cache import PagedKVCache
from .kv.pool import KVPool, LayerSpec, default_kv_memory

logger = logging.getLogger(__name__)

# Architectures whose greedy, batched, sampled and beam outputs are tested token for token.
SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt2", "opt",
)
# Attention features the paged kernels do not implement.
_REJECTED = {
    "gpt_oss": "attention sinks",
    "llama4": "chunked attention",
    "llama4_text": "chunked attention",
    "deepseek_v2": "multi-head latent attention",
    "deepseek_v3": "multi-head latent attention",
    "gemma3n": "KV sharing across layers",
    "gemma3n_text": "KV sharing across layers",
}
_LAYER_TYPES = {"full_attention", "sliding_attention"}


class UnsupportedModelError(ValueError):
    """The model cannot keep its KV cache in hf_paged's blocks."""


@dataclass(slots=True)
class WrapState:
    pool: KVPool
    previous_attn: str | None
    cache_kwarg: str
    options: dict
    hooks: list = field(default_factory=list)
    engine_step: bool = False  # a forward the engine planned (paged_metadata given) is running


def _unsupported(model: torch.nn.Module, why: str) -> UnsupportedModelError:
    name = type(model).__name__
    return UnsupportedModelError(
        f"hf_paged cannot wrap {name}: {why}. Supported: decoder-only models that route attention "
        f"through transformers' AttentionInterface, tested for model types {', '.join(SUPPORTED_MODEL_TYPES)}.")


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of ``model``, ordered by ``layer_idx``."""
    mods = [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and type(m).__name__.endswith("Attention")]
    return sorted(mods, key=lambda m: m.layer_idx)


def _check_supported(model: torch.nn.Module) -> list[torch.nn.Module]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise _unsupported(model, "it is not a transformers generative model")
    if getattr(config, "is_encoder_decoder", False):
        raise _unsupported(model, "encoder-decoder models are not supported")
    model_type = getattr(config, "model_type", "?")
    if model_type in _REJECTED:
        raise _unsupported(model, f"its {_REJECTED[model_type]} is not implemented")
    if not getattr(model, "_supports_attention_backend", False):
        raise _unsupported(model, "its modeling code does not route attention through AttentionInterface")
    layer_types = getattr(config, "layer_types", None)
    if layer_types and not set(layer_types) <= _LAYER_TYPES:
        raise _unsupported(model, f"it has layer types {sorted(set(layer_types) - _LAYER_TYPES)}")
    mods = attention_modules(model)
    n = getattr(config, "num_hidden_layers", len(mods))
    if not mods or [m.layer_idx for m in mods] != list(range(n)):
        raise _unsupported(model, "its attention modules do not map one to one onto layer indices")
    if model_type not in SUPPORTED_MODEL_TYPES:
        warnings.warn(f"hf_paged: model type {model_type!r} is not in the tested set; outputs may differ",
                      stacklevel=3)
    return mods


def tp_size(model: torch.nn.Module) -> int:
    """How many ranks share this model's layers (``from_pretrained(..., tp_plan="auto")``); 1 otherwise."""
    return int(getattr(base_model(model), "_tp_size", None) or 1)


def _agreed_num_blocks(specs: list[LayerSpec], block_size: int) -> int | None:
    """Tensor parallel with the default KV budget (a share of the free memory, which differs between ranks):
    the fewest blocks any rank's budget holds, so that every rank's pool has the same blocks (a rank out of
    blocks alone would leave the others waiting in the forward's collectives). Every rank wraps alike."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    blocks = default_kv_memory(specs[0].device) // KVPool.bytes_per_block(specs, block_size)
    t = torch.tensor([blocks], dtype=torch.int64, device=specs[0].device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return max(int(t.item()), 1)


def _layer_specs(model: torch.nn.Module, mods: list[torch.nn.Module]) -> list[LayerSpec]:
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    world = tp_size(model)
    if world > 1:
        # Tensor parallel: each rank computes, and keeps K/V for, only its share of the KV heads.
        if kv_heads % world:
            raise _unsupported(model, f"its {kv_heads} KV heads do not split over {world} tensor-parallel ranks")
        kv_heads //= world
    specs = []
    for m in mods:
        head_dim = getattr(m, "head_dim", None) or getattr(m, "head_size", None) or config.hidden_size // heads
        param = next(m.parameters())
        device = param.to_local().device if hasattr(param, "to_local") else param.device  # a DTensor under TP
        specs.append(LayerSpec(int(kv_heads), int(head_dim), param.dtype, device))
    return specs


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5.2x renamed the forward argument ``past_key_values`` to ``cache``.
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _bound_input(args, kwargs, name, position):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _pre_hook(model, args, kwargs):
    state: WrapState = model._hf_paged
    state.engine_step = kwargs.get("paged_metadata") is not None
    if state.engine_step:  # the engine planned this forward itself
        return None
    key = state.cache_kwarg
    cache = kwargs.get(key, kwargs.get("past_key_values"))
    if cache is None:
        cache = PagedKVCache(state.pool)
        cache._transient = not kwargs.get("use_cache", True)
        cache._from_hook = True
        kwargs[key] = cache
    elif not isinstance(cache, PagedKVCache):
        raise ValueError(
            f"a model wrapped by hf_paged keeps its KV cache in paged blocks; got a {type(cache).__name__}. "
            "Pass no cache, or hf_paged.PagedKVCache(hf_paged.kv_pool(model)) to continue from an earlier call")
    if "past_key_values" in kwargs and key != "past_key_values":
        kwargs[key] = kwargs.pop("past_key_values")
    ids = _bound_input(args, kwargs, "input_ids", 0)
    embeds = kwargs.get("inputs_embeds")
    shape_src = ids if ids is not None else embeds
    if shape_src is None:
        return None
    batch, q_len = shape_src.shape[0], shape_src.shape[1]
    mask = _bound_input(args, kwargs, "attention_mask", 1)
    _check_mask(mask, kwargs.get("position_ids"), q_len)
    new_mask = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= q_len:
        new_mask = mask[:, -q_len:].bool()
    kwargs["paged_metadata"] = cache.plan(batch, q_len, new_mask, ids)
    return args, kwargs


def _check_mask(mask: Any, position_ids: Any, q_len: int) -> None:
    """The paged attention reads a 2D padding mask and attends causally within each row: a mask of another
    shape (4D, one per layer type) or packed sequences (position ids that restart within a row, which
    transformers turns into a block-diagonal mask) would be ignored, so they are refused."""
    if isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() != 2):
        shape = "a dict of masks" if isinstance(mask, dict) else f"a {mask.dim()}D mask"
        raise ValueError(f"a model wrapped by hf_paged takes a 2D attention_mask ([batch, length], 1 = token, "
                         f"0 = padding); got {shape}. Custom and packed-sequence masks are not supported")
    if mask is None and isinstance(position_ids, torch.Tensor) and q_len > 1 and position_ids.dim() == 2 \
            and bool((position_ids[:, 1:] - position_ids[:, :-1] != 1).any()):
        raise ValueError("a model wrapped by hf_paged attends causally over each row: position_ids that restart "
                         "within a row (packed sequences) are not supported; pass one sequence per row")


def _post_hook(model, args, kwargs, output):
    # Registered with always_call: also runs when the forward raised (then ``output`` is None).
    state: WrapState = model._hf_paged
    state.engine_step = False
    cache = kwargs.get(state.cache_kwarg, kwargs.get("past_key_values"))
    if not isinstance(cache, PagedKVCache):
        return output
    if output is None:
        cache.rollback()
        if getattr(cache, "_from_hook", False):
            cache.release()  # nobody will ever see this cache
    else:
        cache.end_step()
        if getattr(cache, "_transient", False):
            cache.release()
    return output


def _padding_check(state: WrapState, original, input_ids, attention_mask):
    """transformers' "input_ids may be padded" warning, skipped in engine steps: they pack sequences into
    one row without padding, and the check (the pad id looked up in the ids) makes the host wait for the
    device, which would stall async scheduling on every eager step (GPT-2 runs it)."""
    if state.engine_step:
        return None
    return original(input_ids, attention_mask)


def _paged_generate(model, original, *args, **kwargs):
    state: WrapState = model._hf_paged
    if any(kwargs.get(k) is not None for k in ("cache", "past_key_values")):
        return original(*args, **kwargs)
    impl = kwargs.get("cache_implementation")
    if impl is not None:
        raise ValueError(f"a model wrapped by hf_paged keeps its KV cache in paged blocks: cache_implementation="
                         f"{impl!r} cannot be used; leave it out (hf_paged.unwrap(model) restores HF's caches)")
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(config, "use_cache", True)
    # Each forward then sees the whole sequence (a paged cache of its own, then none). Not with inputs_embeds:
    # generate() turns the cache back on for them, and the paged one must be the cache it uses.
    if use_cache is False and kwargs.get("inputs_embeds") is None:
        return original(*args, **kwargs)
    cache = PagedKVCache(state.pool)
    kwargs[state.cache_kwarg] = cache
    # Checkpoints such as Gemma2 ask for a "hybrid" cache; the paged cache replaces it.
    kwargs.setdefault("cache_implementation", None)
    try:
        return original(*args, **kwargs)
    finally:
        cache.release()


def wrap(model: torch.nn.Module, *, config: EngineConfig | None = None, **options: Any) -> torch.nn.Module:
    """Make ``model`` keep its KV cache in paged blocks. Returns the same model object.

    The pool is sized once from the config's KV fields (:class:`~hf_paged.config.EngineConfig`:
    ``block_size``, ``kv_memory`` as bytes or ``"1GiB"`` or ``num_blocks``, ``enable_prefix_caching``),
    given as ``config=`` and/or as keyword arguments. Idempotent: wrapping a wrapped model with the same
    options changes nothing; other options rebuild the pool.

    A PEFT ``PeftModel`` is wrapped through its base model (where PEFT injected the LoRA layers), so
    ``generate()`` of the wrapped PeftModel equals the unwrapped one, after ``set_adapter`` too.

    Steps: (1) check the architecture, (2) register the paged attention and mask functions and switch
    the model to them, (3) allocate the pool, (4) add the forward hooks and the paged ``generate``,
    (5) on CPU, reroute ``nn.Linear`` and RMSNorm forwards to the C++ kernels
    (:mod:`hf_paged.kernels.cpu_layers`; same results, verified per module at install).
    """
    config = EngineConfig.from_kwargs(config, **options)
    if is_peft(model):
        # A PeftModel's generate() and forward() end in its base transformers model, where the LoRA
        # layers were injected: that model gets the hooks, the cache and the pool.
        peft_config = getattr(model, "active_peft_config", None)
        if getattr(peft_config, "is_prompt_learning", False):
            raise _unsupported(model, "prompt-learning PEFT methods add virtual tokens outside the KV blocks")
        wrap(model.get_base_model(), config=config)
        return model
    options = config.kv_options()
    kv_memory, num_blocks, block_size = config.kv_memory, config.num_blocks, config.block_size
    state = getattr(model, "_hf_paged", None)
    if state is not None:
        if state.options == options or (kv_memory is None and num_blocks is None
                                         and block_size == state.options["block_size"]):
            return model
        unwrap(model)
    mods = _check_supported(model)
    attention.register()
    specs = _layer_specs(model, mods)
    if kv_memory is None and num_blocks is None and tp_size(model) > 1:
        num_blocks = _agreed_num_blocks(specs, block_size)
    pool = KVPool.sized(specs, block_size, kv_memory=kv_memory, num_blocks=num_blocks,
                        enable_prefix_caching=config.enable_prefix_caching)
    previous = getattr(model.config, "_attn_implementation", None)
    state = WrapState(pool, previous, _cache_kwarg(model), options)
    model._hf_paged = state
    _set_attn(model, attention.ATTN_NAME)
    state.hooks.append(model.register_forward_pre_hook(_pre_hook, with_kwargs=True))
    state.hooks.append(model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True))
    model.generate = functools.partial(_paged_generate, model, type(model).generate.__get__(model))
    for mod in model.modules():
        check = getattr(type(mod), "warn_if_padding_and_no_attention_mask", None)
        if check is not None:
            mod.warn_if_padding_and_no_attention_mask = functools.partial(_padding_check, state, check.__get__(mod))
    from .kernels import cpu as cpu_kernels
    from .kernels import cpu_layers

    cpu_layers.install(model)
    if any(k.device.type == "cpu" for k in pool.k):
        cpu_kernels.available()  # build (or load) the C++ kernel now, not on the first request
    logger.info("hf_paged: %d blocks x %d tokens (%.1f MiB)", pool.num_blocks, block_size, pool.nbytes / 2**20)
    return model


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model that :func:`wrap` hooks: ``model`` itself, or a PeftModel's base model
    (for LoRA, calling it runs the active adapters: PEFT injected them into its layers)."""
    return model.get_base_model() if is_peft(model) else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`wrap`: the model's own attention and caches again; the pool is dropped."""
    if is_peft(model):
        unwrap(model.get_base_model())
        return model
    state = getattr(model, "_hf_paged", None)
    if state is None:
        return model
    for h in state.hooks:
        h.remove()
    model.__dict__.pop("generate", None)
    for mod in model.modules():
        mod.__dict__.pop("warn_if_padding_and_no_attention_mask", None)
    from .kernels import cpu_layers

    cpu_layers.remove(model)
    _set_attn(model, state.previous_attn or "sdpa")
    del model._hf_paged
    return model


def _set_attn(model: torch.nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:
        model.config._attn_implementation = name


def is_wrapped(model: torch.nn.Module) -> bool:
    return getattr(base_model(model), "_hf_paged", None) is not None


def kv_pool(model: torch.nn.Module) -> KVPool:
    """The pool of a wrapped model (for stats and tests)."""
    if not is_wrapped(model):
        raise ValueError("model is not wrapped by hf_paged.wrap()")
    return base_model(model)._hf_paged.pool
