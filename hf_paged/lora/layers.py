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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import kernels

if TYPE_CHECKING:
    from .adapters import AdapterSet

_ORIGINAL = "_hf_paged_lora_original"


@dataclass(slots=True)
class LoraBatch:
    """Which packed tokens run which adapter in this step: ``segments`` = ``(start, end, slot)`` runs of
    adapter tokens (base-model tokens are in none), and their device copy for the Triton kernel."""

    segments: list[tuple[int, int, int]]
    device_args: tuple[torch.Tensor, ...] | None = None

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
        device_args = None
        if segments and device.type == "cuda":
            dev = [torch.tensor([s[i] for s in segments], dtype=torch.int32) for i in range(3)]
            dev[1] = dev[1] - dev[0]  # lengths
            device_args = tuple(t.to(device, non_blocking=True) for t in dev)
        return cls(segments, device_args)


@dataclass(slots=True)
class LayerWeights:
    """One LoRA layer's adapters stacked by slot: ``a [S, R, in]``, ``b [S, out, R]`` (zero past each
    adapter's rank), ``ranks[slot]`` (0: the adapter does not target this layer) and ``scales[slot]``."""

    a: torch.Tensor
    b: torch.Tensor
    ranks: list[int]
    scales: list[float]
    device_args: tuple[torch.Tensor, ...] | None = None


def is_lora_linear(module: torch.nn.Module) -> bool:
    from peft.tuners.lora import layer as lora_layer

    return isinstance(module, lora_layer.Linear)


def stack(layer: torch.nn.Module, slots: dict[str, int], num_slots: int, stacked_rank: int) -> LayerWeights:
    """The stacked weights of ``layer`` for the adapters ``slots`` (PEFT name -> slot)."""
    base = layer.get_base_layer()
    weight = base.weight
    in_f, out_f = layer.in_features, layer.out_features
    a = torch.zeros(num_slots, stacked_rank, in_f, dtype=weight.dtype, device=weight.device)
    b = torch.zeros(num_slots, out_f, stacked_rank, dtype=weight.dtype, device=weight.device)
    ranks, scales = [0] * num_slots, [0.0] * num_slots
    for name, slot in slots.items():
        if name not in layer.lora_A:
            continue
        wa, wb = layer.lora_A[name].weight, layer.lora_B[name].weight
        r = wa.shape[0]
        a[slot, :r] = wa.to(a.dtype)
        b[slot, :, :r] = wb.to(b.dtype)
        ranks[slot], scales[slot] = r, float(layer.scaling[name])
    device_args = None
    if weight.is_cuda:
        device_args = (torch.tensor(ranks, dtype=torch.int32, device=weight.device),
                       torch.tensor(scales, dtype=torch.float32, device=weight.device))
    return LayerWeights(a, b, ranks, scales, device_args)


def _batched_forward(layer: torch.nn.Module, adapters: "AdapterSet", x: torch.Tensor, *args: Any,
                     **kwargs: Any) -> torch.Tensor:
    batch = adapters.batch
    if batch is None:  # not an engine step: PEFT's forward (its active adapters, for every row)
        return getattr(layer, _ORIGINAL)(x, *args, **kwargs)
    out = layer.base_layer(x, *args, **kwargs)
    if batch.segments:
        w: LayerWeights = layer._hf_paged_lora
        x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        device_args = (*w.device_args, *batch.device_args) if batch.device_args is not None else None
        kernels.lora_add(out2, x2.to(w.a.dtype), w.a, w.b, w.ranks, w.scales, batch.segments,
                         device_args=device_args)
    return out


def install(model: torch.nn.Module, adapters: "AdapterSet") -> list[torch.nn.Module]:
    """Give every PEFT LoRA linear of ``model`` the batched forward (once); returns all of them."""
    layers = []
    for m in model.modules():
        if is_lora_linear(m):
            if _ORIGINAL not in m.__dict__:
                setattr(m, _ORIGINAL, m.forward)
                m.forward = lambda x, *a, _m=m, **k: _batched_forward(_m, adapters, x, *a, **k)
            layers.append(m)
    return layers


def remove(model: torch.nn.Module) -> None:
    for m in model.modules():
        if _ORIGINAL in m.__dict__:
            del m.__dict__[_ORIGINAL]
            m.__dict__.pop("forward", None)  # the class's forward again
            m.__dict__.pop("_hf_paged_lora", None)
