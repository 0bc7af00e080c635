"""LoRA adapters served many at once: :class:`AdapterSet` (loading through PEFT, slots, prefix-cache
salts) and the batched LoRA layers (:mod:`.layers`; kernels in :func:`hf_paged.kernels.lora_add`)."""
from .adapters import MAX_RANK, Adapter, AdapterSet, is_peft
from .layers import LoraBatch

__all__ = ["Adapter", "AdapterSet", "LoraBatch", "MAX_RANK", "is_peft"]
