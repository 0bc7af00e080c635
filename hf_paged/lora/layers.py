"""Batched LoRA inside PEFT's LoRA layers: each engine step runs every adapter's tokens, and the base
model's, in one flat forward.

PEFT's ``lora.Linear`` keeps ``base_layer`` plus ``lora_A[name]``/``lora_B[name]``/``scaling[name]``
per adapter and applies its *active* adapters to every row. :func:`install` gives each such layer a
forward that, during an engine step (``AdapterSet.batch`` set by the runner), computes
``base_layer(x)`` and then adds each adapter's low-rank update to its own tokens only, through
:func:`hf_paged.kernels.lora_add` (grouped matmuls per contiguous token run on CPU, the Triton SGMV
kernel on GPU). Outside an engine step (``model.generate()``) PEFT's own forward runs unchanged.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import kernels
from ..kv.metadata import to_device

if TYPE_CHECKING:
    from .adapters import AdapterSet

_ORIGINAL = "_hf_paged_lora_original"


@dataclass(slots=True)
class LoraBatch:
    """Which packed tokens run which adapter in this step: ``segments`` = ``(start, end, slot)`` runs of
    adapter tokens (base-model tokens are in none); on CPU ``token_slot`` ``[T]`` (-1: the base model)
    for the C++ kernel, and on GPU ``device_args`` = ``(seg_start, seg_len, seg_slot)`` for the Triton kernel."""

    segments: list[tuple[int, int, int]]
    token_slot: torch.Tensor | None = None
    device_args: tuple[torch.Tensor, ...] | None = None
    cpu_kernel: bool = False  # fp32 CPU layers call the C++ kernel directly (resolved once per step)

    @property
    def max_len(self) -> int:
        return max((e - s for s, e, _ in self.segments), default=0)

    @classmethod
    def build(cls, slots: list[int | None], lens: list[int], device: torch.device) -> "LoraBatch":
        """``slots[i]``/``lens[i]``: the adapter slot (None for the base model) and token count of the
        i-th packed sequence; neighbours with one adapter merge into one segment."""
        segments: list[tuple[int, int, int]] = []
        at = 0
        for slot, n in zip(slots, lens):
            if slot is not None and n:
                if segments and segments[-1][2] == slot and segments[-1][1] == at:
                    segments[-1] = (segments[-1][0], at + n, slot)
                else:
                    segments.append((at, at + n, slot))
            at += n
        batch = cls(segments)
        if segments:
            if device.type == "cpu":  # the C++ kernel's per-token slots
                token_slot = torch.full((at,), -1, dtype=torch.int32)
                for start, end, slot in segments:
                    token_slot[start:end] = slot
                batch.token_slot = token_slot
                batch.cpu_kernel = kernels.resolve_backend("auto", token_slot) == "cpu"
            else:
                seg = torch.tensor([[s, e - s, slot] for s, e, slot in segments], dtype=torch.int32)
                batch.device_args = tuple(to_device(seg.t().contiguous(), device))  # pinned, without waiting
        return batch


@dataclass(slots=True)
class LayerWeights:
    """One LoRA layer's adapters stacked by slot: ``a [S, R, in]``, ``b [S, out, R]`` (zero past each
    adapter's rank; ``bt`` = ``b`` transposed to ``[S, R, out]`` for the C++ kernel), ``ranks[slot]``
    (0: the adapter does not target this layer) and ``scales[slot]``, also as tensors on the device."""

    a: torch.Tensor
    b: torch.Tensor
    ranks: list[int]
    scales: list[float]
    ranks_t: torch.Tensor
    scales_t: torch.Tensor
    bt: torch.Tensor
    targeted: bool = True  # some loaded adapter targets this layer

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor, ranks: list[int], scales: list[float]) -> "LayerWeights":
        dev = a.device
        return cls(a, b, list(ranks), list(scales), torch.tensor(ranks, dtype=torch.int32, device=dev),
                   torch.tensor(scales, dtype=torch.float32, device=dev), b.transpose(1, 2).contiguous(),
                   any(ranks))


def is_lora_linear(module: torch.nn.Module) -> bool:
    from peft.tuners.lora import layer as lora_layer

    return isinstance(module, lora_layer.Linear)


def stack(layer: torch.nn.Module, slots: dict[str, int], num_slots: int, stacked_rank: int) -> LayerWeights:
    """The stacked weights of ``layer`` for the adapters ``slots`` (PEFT name -> slot)."""
    weight = layer.get_base_layer().weight
    a = torch.zeros(num_slots, stacked_rank, layer.in_features, dtype=weight.dtype, device=weight.device)
    b = torch.zeros(num_slots, layer.out_features, stacked_rank, dtype=weight.dtype, device=weight.device)
    ranks, scales = [0] * num_slots, [0.0] * num_slots
    for name, slot in slots.items():
        if name not in layer.lora_A:
            continue
        wa, wb = layer.lora_A[name].weight, layer.lora_B[name].weight
        r = wa.shape[0]
        a[slot, :r] = wa.to(a.dtype)
        b[slot, :, :r] = wb.to(b.dtype)
        ranks[slot], scales[slot] = r, float(layer.scaling[name])
    return LayerWeights.of(a, b, ranks, scales)


def _batched_forward(layer: torch.nn.Module, adapters: "AdapterSet", x: torch.Tensor, *args: Any,
                     **kwargs: Any) -> torch.Tensor:
    batch = adapters.batch
    if batch is None:  # not an engine step: PEFT's forward (its active adapters, for every row)
        return getattr(layer, _ORIGINAL)(x, *args, **kwargs)
    out = layer.base_layer(x, *args, **kwargs)
    if not batch.segments:  # only base-model tokens in this step
        return out
    w: LayerWeights = layer._hf_paged_lora
    if w.targeted:
        x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        if batch.cpu_kernel and x2.dtype == w.a.dtype == torch.float32 and x2.stride(-1) == 1:
            # This runs for every LoRA layer of every step: straight to the op (kernels.lora_add's "cpu").
            torch.ops.hf_paged_cpu.lora_sgmv(out2, x2, w.a, w.bt, w.ranks_t, w.scales_t, batch.token_slot)
        else:
            kernels.lora_add(out2, x2.to(w.a.dtype), w, batch)
    return out


def install(model: torch.nn.Module, adapters: "AdapterSet") -> list[torch.nn.Module]:
    """Give every PEFT LoRA linear of ``model`` the batched forward (once); returns all of them."""
    layers = []
    for m in model.modules():
        if is_lora_linear(m):
            if _ORIGINAL not in m.__dict__:
                setattr(m, _ORIGINAL, m.forward)
                m.forward = functools.partial(_batched_forward, m, adapters)
            layers.append(m)
    return layers


def remove(model: torch.nn.Module) -> None:
    for m in model.modules():
        if _ORIGINAL in m.__dict__:
            del m.__dict__[_ORIGINAL]
            m.__dict__.pop("forward", None)  # the class's forward again
            m.__dict__.pop("_hf_paged_lora", None)
