"""AdapterSet: the LoRA adapters one engine serves over one base model, by name.

Adapters are loaded with PEFT's own loading (``PeftModel.from_pretrained`` / ``load_adapter`` read the
adapter folder's config and safetensors and inject the LoRA layers); this module only checks what the
batched path supports, gives each adapter a slot in the stacked weights of every LoRA layer
(:mod:`.layers`) and a unique id that salts the prefix cache, so K/V computed under one adapter is
never reused for another (or for a later adapter loaded under the same name).

Example::

    adapters = AdapterSet(model)                  # a PeftModel's adapters are adopted by their names
    adapters.load("sql", "/adapters/sql-lora")    # a folder written by PeftModel.save_pretrained
    adapters.get("sql").slot, adapters.names       # -> 0, ['sql']
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..wrap import is_peft
from . import layers
from .layers import LoraBatch

logger = logging.getLogger(__name__)
# An adapter's uid salts its prefix-cache hashes. The KV pool, and so its prefix cache, belongs to the model and
# outlives a pipeline: uids are unique in the process, so that a later pipeline's adapter never meets blocks
# computed under an earlier pipeline's.
_UIDS = itertools.count(1)

MAX_RANK = 64


@dataclass(slots=True, eq=False)
class Adapter:
    """One loaded adapter. ``uid`` is unique per load (the prefix-cache salt); ``slot`` indexes the
    stacked weights; ``unloaded`` turns True when it is unloaded (requests still queued for it fail)."""

    name: str
    uid: int
    slot: int
    rank: int
    target_modules: list[str] = field(default_factory=list)
    path: str | None = None
    unloaded: bool = False


class AdapterSet:
    """The adapters of one engine. Not thread-safe: PagedPipeline calls it from its engine thread."""

    def __init__(self, model: torch.nn.Module, *, max_rank: int = MAX_RANK) -> None:
        if getattr(model, "_hf_peft_config_loaded", False) and not is_peft(model):
            # Its LoRA layers would run for every request as the base model, and stop once an adapter is loaded
            raise ValueError("the model holds adapters loaded by transformers' load_adapter(): load them with "
                             "peft.PeftModel.from_pretrained, or name them in lora_adapters, to serve them")
        self.peft = model if is_peft(model) else None
        # A PeftModel made here (adapters loaded into a plain model): PEFT's own forward, which
        # model.generate() runs, keeps answering as the base model, as the caller's model did.
        self._owns_peft = self.peft is None
        self.base = model.get_base_model() if self.peft is not None else model
        self.max_rank = max_rank
        # Set by the runner for the duration of one engine forward (see layers._batched_forward).
        self.batch: LoraBatch | None = None
        self._by_name: dict[str, Adapter] = {}
        self._layers: list[torch.nn.Module] = []
        if self.peft is not None:
            for name, config in self.peft.peft_config.items():
                self._check_config(name, config)
                self._check_layers(name)
            for name, config in self.peft.peft_config.items():
                self._register(name, config, None)
            self._restack()

    # ------------------------------------------------------------------ lookup
    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def loaded(self) -> list[Adapter]:
        """The loaded adapters, in load order (a snapshot: safe to read from any thread)."""
        return list(self._by_name.values())

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def has_layers(self) -> bool:
        """True once the model holds PEFT LoRA layers (then every engine step sets a batch)."""
        return bool(self._layers)

    def get(self, name: str | None) -> Adapter | None:
        """The adapter called ``name`` (None: the base model). Unknown names are a ValueError that lists
        the loaded ones."""
        if name is None:
            return None
        adapter = self._by_name.get(name) if isinstance(name, str) else None
        if adapter is None:
            loaded = ", ".join(repr(n) for n in self._by_name) or "none"
            raise ValueError(f"adapter: {name!r} is not loaded; loaded adapters: {loaded}")
        return adapter

    # ------------------------------------------------------------------ load / unload
    def load(self, name: str, path: str) -> Adapter:
        """Load the PEFT LoRA adapter saved at ``path`` under ``name``."""
        from peft import PeftConfig, PeftModel

        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._by_name:
            raise ValueError(f"adapter {name!r} is already loaded; unload it first")
        try:
            config = PeftConfig.from_pretrained(str(path))
        except Exception as exc:
            raise ValueError(f"adapter {name!r}: cannot read a PEFT adapter config at {path!r}: {exc}") from exc
        self._check_config(name, config)
        first = self.peft is None
        had_config = hasattr(self.base, "peft_config")
        try:
            if first:
                self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, config=config)
            else:
                self.peft.load_adapter(str(path), adapter_name=name)
        except Exception as exc:
            self._undo(name, first, had_config)
            raise ValueError(f"adapter {name!r} does not fit this model: {type(exc).__name__}: {exc}") from exc
        self.peft.eval()
        if self._owns_peft:
            self.peft.base_model.disable_adapter_layers()
        try:
            self._check_layers(name)
        except ValueError:
            self._undo(name, first, had_config)
            raise
        adapter = self._register(name, config, str(path))
        try:
            self._restack()
        except Exception as exc:
            adapter.unloaded = True
            self._undo(name, first, had_config)
            raise ValueError(f"adapter {name!r} could not be stacked: {type(exc).__name__}: {exc}") from exc
        logger.info("hf_paged: loaded LoRA adapter %r (rank %d, slot %d) from %s", name, adapter.rank,
                    adapter.slot, path)
        return adapter

    def _undo(self, name: str, first: bool, had_config: bool) -> None:
        """Take a half-loaded adapter out again: a request naming it would fail inside a step, and the layers
        PEFT injected for a first one would run for every request."""
        self._by_name.pop(name, None)
        if self.peft is not None and name in self.peft.peft_config:
            self.peft.delete_adapter(name)
        if first:
            self.peft = None
            _strip_lora_layers(self.base, keep_config=had_config)
        try:
            self._restack()
        except Exception:  # noqa: BLE001 - the load's own error is the one to report
            logger.exception("hf_paged: restacking the adapters after a failed load failed too")

    def unload(self, name: str) -> None:
        """Forget adapter ``name`` (its weights leave the model; its cached prefix blocks age out)."""
        adapter = self.get(name)
        self.peft.delete_adapter(name)
        del self._by_name[name]
        adapter.unloaded = True
        self._restack()
        logger.info("hf_paged: unloaded LoRA adapter %r", name)

    # ------------------------------------------------------------------ engine step
    @contextlib.contextmanager
    def active(self, batch: LoraBatch) -> Iterator[None]:
        """Run the LoRA layers batched (per token run) for the forward inside this block."""
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None

    # ------------------------------------------------------------------ internals
    def _check_config(self, name: str, config: Any) -> None:
        from peft import PeftType

        if getattr(config, "peft_type", None) != PeftType.LORA:
            raise ValueError(f"adapter {name!r}: only LoRA adapters are served, got {config.peft_type}")
        rank = max([config.r, *getattr(config, "rank_pattern", {}).values()])
        if rank > self.max_rank:
            raise ValueError(f"adapter {name!r}: rank {rank} exceeds the largest served rank {self.max_rank}")
        for flag, what in (("use_dora", "DoRA"), ("lora_bias", "a LoRA bias"),
                           ("alora_invocation_tokens", "activated LoRA (aLoRA)"), ("use_qalora", "QALoRA"),
                           ("layer_replication", "layer_replication (it copies decoder layers of the shared model)")):
            if getattr(config, flag, False):
                raise ValueError(f"adapter {name!r}: {what} is not supported by the batched LoRA path")
        if getattr(config, "bias", "none") != "none":  # PEFT would load its biases into the shared base layers
            raise ValueError(f"adapter {name!r}: bias={config.bias!r} is not supported (it changes the base "
                             "model's own biases, for every request); only bias='none'")
        from ..kernels.cpu import LORA_MAX_RANK

        if rank > LORA_MAX_RANK and self.base.get_input_embeddings().weight.device.type == "cpu":
            raise ValueError(f"adapter {name!r}: rank {rank}: the CPU LoRA kernel serves ranks up to {LORA_MAX_RANK}")
        for flag in ("modules_to_save", "trainable_token_indices"):
            if getattr(config, flag, None):
                raise ValueError(f"adapter {name!r}: {flag} ({getattr(config, flag)!r}) is not supported: the "
                                 "batched LoRA path serves the LoRA weights only, not whole trained modules")

    def _check_layers(self, name: str) -> None:
        """The layers adapter ``name`` adapts (once injected) must be ones the batched path serves."""
        odd = [n for n, m in self.base.named_modules()
               if name in getattr(m, "lora_A", {}) and not layers.is_lora_linear(m)]
        odd += [n for n, m in self.base.named_modules() if name in getattr(m, "lora_embedding_A", {})]
        if odd:
            raise ValueError(f"adapter {name!r}: LoRA on non-linear layers is not supported ({odd[:3]})")
        # A variant (DoRA, aLoRA, VeLoRA, KaSA, ...) changes the forward; the batched path runs plain LoRA.
        variant = [type(m.lora_variant[name]).__name__ for m in self.base.modules()
                   if getattr(m, "lora_variant", {}).get(name) is not None]
        if variant:
            raise ValueError(f"adapter {name!r}: a LoRA variant ({variant[0]}) is not supported by the batched "
                             "LoRA path")
        merged = [n for n, m in self.base.named_modules() if name in getattr(m, "merged_adapters", ())]
        if merged:  # its update is in the base weights: every request would get it, adapter rows twice
            raise ValueError(f"adapter {name!r} is merged into the base weights ({merged[0]}); unmerge it "
                             "(unmerge_adapter()) to serve it")
        head = self.base.get_output_embeddings()
        if head is not None and name in getattr(head, "lora_A", {}):
            # The engine runs the output layer on the sampled rows only, not on every token of the step.
            raise ValueError(f"adapter {name!r}: LoRA on the output layer (lm_head) is not supported")

    def _register(self, name: str, config: Any, path: str | None) -> Adapter:
        used = {a.slot for a in self._by_name.values()}
        slot = next(i for i in itertools.count() if i not in used)
        targets = config.target_modules
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else [str(targets)]
        rank = max([config.r, *getattr(config, "rank_pattern", {}).values()])
        adapter = Adapter(name, next(_UIDS), slot, rank, targets, path)
        self._by_name[name] = adapter
        return adapter

    def _restack(self) -> None:
        self._layers = layers.install(self.base, self)
        slots = {a.name: a.slot for a in self._by_name.values()}
        num_slots = max(slots.values(), default=0) + 1
        top = max((m.lora_A[n].weight.shape[0] for m in self._layers for n in slots if n in m.lora_A), default=1)
        stacked_rank = max(16, 1 << (top - 1).bit_length())
        for m in self._layers:
            m._hf_paged_lora = layers.stack(m, slots, num_slots, stacked_rank)


def _strip_lora_layers(model: torch.nn.Module, keep_config: bool) -> None:
    """Put back the base layers that PEFT wrapped in ``model`` (what a failed first load leaves behind)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if not keep_config and hasattr(model, "peft_config"):
        del model.peft_config
