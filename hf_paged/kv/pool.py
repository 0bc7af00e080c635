"""KVPool: the per-layer block tensors of a paged KV cache and the allocator that hands them out."""
from __future__ import annotations

import math
import mmap
import re
import sys
from dataclasses import dataclass

import torch

from .blocks import BlockAllocator

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """``"1GiB"``, ``"512MB"``, ``2e9`` -> bytes."""
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"kv_memory must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"kv_memory {value!r} is not a size such as 1GiB, 512MiB, 2GB or a number of bytes")
    out = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if out <= 0:
        raise ValueError(f"kv_memory must be positive, got {value!r}")
    return out


@dataclass(slots=True, frozen=True)
class LayerSpec:
    """Shape and placement of one attention layer's KV blocks."""

    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zero-filled block tensor. On Linux CPU, a large one is an anonymous memory map: its pages are
    the kernel's shared zero page until first written, so blocks no sequence has used yet take no
    memory (the pool's resident size follows what is used, not what is reserved), and it asks for
    transparent huge pages: decode attention jumps between blocks all over the pool, and with 4 KiB
    pages each block costs TLB misses (measured: ~8% of the C++ decode kernel's time on a 1 GiB pool).
    The advice only takes where the kernel's THP mode allows it (``madvise`` or ``always``).
    """
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if device.type == "cpu" and sys.platform.startswith("linux") and nbytes >= 2 * _HUGE_PAGE:
        try:
            mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError, AttributeError):  # no anonymous maps here: plain zeros below
            mm = None
        if mm is not None:
            try:
                mm.madvise(_MADV_HUGEPAGE)
            except (OSError, ValueError, AttributeError):  # keep normal pages
                pass
            # The tensor holds the map (frombuffer keeps its buffer alive); it is unmapped with it.
            return torch.frombuffer(mm, dtype=dtype, count=numel).view(shape)
    return torch.zeros(shape, dtype=dtype, device=device)


class KVPool:
    """Block tensors ``[num_blocks, block_size, num_kv_heads, head_dim]`` per layer, one allocator.

    Each layer's pair lives on that layer's device, so an accelerate ``device_map`` spreads the cache
    the way it spreads the weights. Sized once; nothing grows per request.
    """

    def __init__(self, layers: list[LayerSpec], num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True) -> None:
        self.layers = layers
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching)
        # Zero-filled: attention multiplies masked-out (never written) slots by 0, and 0 * NaN is NaN.
        shapes = [((num_blocks, block_size, s.num_kv_heads, s.head_dim), s.dtype, s.device) for s in layers]
        self.k = [_zeros(*a) for a in shapes]
        self.v = [_zeros(*a) for a in shapes]

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @staticmethod
    def bytes_per_block(layers: list[LayerSpec], block_size: int) -> int:
        return sum(2 * block_size * s.num_kv_heads * s.head_dim * s.dtype.itemsize for s in layers)

    @classmethod
    def sized(cls, layers: list[LayerSpec], block_size: int, *, kv_memory: int | float | str | None = None,
              num_blocks: int | None = None, enable_prefix_caching: bool = True) -> "KVPool":
        """A pool of ``num_blocks`` blocks, or as many as fit in ``kv_memory`` bytes."""
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        per_block = cls.bytes_per_block(layers, block_size)
        if num_blocks is not None and kv_memory is not None:
            raise ValueError("give either kv_memory or num_blocks, not both")
        if num_blocks is None:
            budget = parse_bytes(kv_memory) if kv_memory is not None else default_kv_memory(layers[0].device)
            num_blocks = budget // per_block
            if num_blocks < 1:
                raise ValueError(f"kv_memory={kv_memory!r} holds no block: one block of {block_size} tokens "
                                 f"takes {per_block} bytes across all layers")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        return cls(layers, int(num_blocks), block_size, enable_prefix_caching)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` in every layer (copy-on-write)."""
        if not pairs:
            return
        from .metadata import to_device

        host = torch.tensor(pairs, dtype=torch.long).t().contiguous()  # [2, n]: sources, destinations
        moved: dict[torch.device, torch.Tensor] = {}
        for k, v in zip(self.k, self.v):
            idx = moved.get(k.device)
            if idx is None:
                idx = moved[k.device] = to_device(host, k.device)
            src, dst = idx[0], idx[1]
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))


def default_kv_memory(device: torch.device) -> int:
    """Half the free memory of a GPU; on CPU 1 GiB or a tenth of the available RAM, whichever is less."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    avail = available_host_bytes()
    return int(min(2**30, (avail if avail is not None else 8 * 2**30) // 10))


def available_host_bytes() -> int | None:
    """Free physical memory of this host (None where the OS does not say)."""
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
