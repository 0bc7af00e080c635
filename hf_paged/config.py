"""EngineConfig: every engine option, its default and its rule, in one place.

``wrap()`` reads the KV fields, ``PagedPipeline`` and the Scheduler the batching fields,
``hf_paged.pipeline()`` passes them through, and both command lines are generated from the fields
(:func:`add_cli_arguments`), so a default is written once, here.

Example::

    cfg = EngineConfig(kv_memory="2GiB", max_num_seqs=64)
    pipe = hf_paged.PagedPipeline(model, tok, config=cfg)
    EngineConfig.from_kwargs(max_num_seqs=0)   # ValueError: max_num_seqs must be an integer >= 1, got 0
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .kv.pool import parse_bytes


def _int_or_none(value: str) -> int | None:
    return None if value.lower() in ("", "none", "auto") else int(value)


def _bool_or_none(value: str) -> bool | None:
    return None if value.lower() in ("", "none", "auto") else _bool(value)


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """Engine options, validated on construction (``ValueError`` names the field)."""

    block_size: int = field(default=16, metadata={"help": "tokens per KV block (a power of two)"})
    kv_memory: int | float | str | None = field(default=None, metadata={
        "help": "KV pool budget, e.g. 1GiB or 512MiB; default: half the free GPU memory, or on CPU "
                "1 GiB or a tenth of the available RAM, whichever is smaller"})
    num_blocks: int | None = field(default=None, metadata={"help": "KV pool size in blocks (instead of kv_memory)"})
    enable_prefix_caching: bool = field(default=True,
                                        metadata={"help": "reuse the KV blocks of shared prompt prefixes"})
    max_num_seqs: int = field(default=128, metadata={"help": "sequences per engine step"})
    max_batch_tokens: int = field(default=2048, metadata={"help": "tokens per engine step (prompt chunks + decodes)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "longest sequence (prompt + output); default and upper bound: the model's context"})

    enforce_eager: bool = field(default=False, metadata={
        "help": "CUDA: run every step eagerly (no CUDA graphs for decode steps)"})
    overlap: bool | None = field(default=None, metadata={
        "help": "deliver (detokenize, stream) each step while the device runs the next one; default: on "
                "for CUDA, off on CPU, where the forward itself holds the cores"})
    async_scheduling: bool | None = field(default=None, metadata={
        "help": "schedule and launch each step before the previous step's tokens reach the host (they go "
                "into the input on the device); implies overlap; default: on for CUDA, off on CPU"})
    compile: bool = field(default=False, metadata={
        "help": "CPU: run decode steps through torch.compile (fused small ops, no per-module Python; "
                "compiling takes tens of seconds when the pipeline starts)"})
    cuda_graph_max_bs: int | None = field(default=None, metadata={
        "help": "CUDA: largest decode batch replayed as a CUDA graph (default: max_num_seqs, at most 512)"})

    lora_adapters: dict[str, str] | None = field(default=None, metadata={
        "help": "PEFT LoRA adapters to serve, name=path[,name=path...]; requests pick one by name"})
    max_lora_rank: int = field(default=64, metadata={"help": "largest LoRA rank an adapter may have"})
    tp_timeout_s: float = field(default=120.0, metadata={
        "help": "tensor parallel: seconds a rank waits for the others before the group is declared broken"})

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_batch_tokens", "max_lora_rank"):
            _positive_int(name, getattr(self, name))
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("num_blocks", "max_model_len", "cuda_graph_max_bs"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.kv_memory is not None:
            parse_bytes(self.kv_memory)  # raises ValueError naming kv_memory
            if self.num_blocks is not None:
                raise ValueError("give either kv_memory or num_blocks, not both")
        if isinstance(self.tp_timeout_s, bool) or not isinstance(self.tp_timeout_s, (int, float)) \
                or not self.tp_timeout_s > 0:
            raise ValueError(f"tp_timeout_s must be a number of seconds > 0, got {self.tp_timeout_s!r}")
        if self.lora_adapters is not None:
            object.__setattr__(self, "lora_adapters", _adapter_map(self.lora_adapters))
        for name in ("overlap", "async_scheduling"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true, false or None (auto), got {getattr(self, name)!r}")
        for name in ("enable_prefix_caching", "enforce_eager", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_kwargs(cls, config: "EngineConfig | None" = None, **kwargs: Any) -> "EngineConfig":
        """``config`` (or the defaults) with ``kwargs`` replacing fields; unknown names are a ValueError."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown}; engine options are {list(cls.names())}")
        return replace(config or cls(), **kwargs)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def kv_options(self) -> dict[str, Any]:
        """The fields ``wrap()`` uses (the pool), as keyword arguments."""
        return dict(block_size=self.block_size, kv_memory=self.kv_memory, num_blocks=self.num_blocks,
                    enable_prefix_caching=self.enable_prefix_caching)


def _adapter_map(value: Any) -> dict[str, str]:
    """``{"name": path}`` from a mapping or from ``"name=path,name=path"``."""
    if isinstance(value, str):
        pairs = [p.partition("=") for p in value.split(",") if p.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError(f"lora_adapters must be name=path[,name=path...], got {value!r}")
        value = {name.strip(): path.strip() for name, _, path in pairs}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k and str(v) for k, v in value.items()):
        raise ValueError(f"lora_adapters must map adapter names to PEFT adapter folders, got {value!r}")
    return {k: str(v) for k, v in value.items()}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


_CLI_TYPES = {"block_size": int, "kv_memory": str, "num_blocks": _int_or_none, "enable_prefix_caching": _bool,
              "max_num_seqs": int, "max_batch_tokens": int, "max_model_len": _int_or_none,
              "enforce_eager": _bool, "compile": _bool, "overlap": _bool_or_none,
              "async_scheduling": _bool_or_none, "cuda_graph_max_bs": _int_or_none,
              "lora_adapters": _adapter_map, "max_lora_rank": int, "tp_timeout_s": float}


def add_cli_arguments(parser: argparse.ArgumentParser, *, suppress_defaults: bool = False) -> None:
    """``--block-size``, ``--kv-memory``, ... one per field, defaults from :class:`EngineConfig`.

    ``suppress_defaults`` leaves a value unset unless given (for a subcommand under a parent parser
    that already defines the options)."""
    for f in fields(EngineConfig):
        default = argparse.SUPPRESS if suppress_defaults else f.default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_CLI_TYPES[f.name], default=default,
                            help=f"{f.metadata['help']} (default: {f.default})")


def from_cli(args: argparse.Namespace) -> EngineConfig:
    """The config of parsed command-line arguments (fields not present keep their defaults)."""
    return EngineConfig.from_kwargs(**{n: getattr(args, n) for n in EngineConfig.names() if hasattr(args, n)})
