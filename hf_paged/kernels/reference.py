"""Pure-torch paged attention: the CPU backend and the oracle the Triton kernels are tested against.

KV layout: ``k_cache``/``v_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]``; a token's
slot is ``block * block_size + offset``. Queries of S sequences are packed back to back
(``cu_seqlens_q``); sequence i's queries are its last ``q_len_i`` positions and attend causally to
all ``seq_lens[i]`` tokens before and including them.

Speed matters here because this is what runs on CPU: decode rows (one query each) are computed in
one batched SDPA call over gathered blocks; prefill rows are batched when padding them to a common
length wastes little, and computed one by one otherwise (never a loop per decode row).
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .varlen import causal_sdpa

# Pad prefill rows into one batch only while the padded work stays within this factor of the real work.
_PAD_WASTE_LIMIT = 1.5
# Decode rows are grouped so that no row in a group is shorter than the longest / this factor: the
# gathered K/V (the dominant memory traffic on CPU) then carries at most that much padding.
_DECODE_LEN_RATIO = 1.4


class _Scratch(threading.local):
    """Reusable gather buffers, one set per thread.

    A fresh multi-megabyte tensor per layer and step costs more in page faults than the copy itself
    on CPU (the allocator returns large blocks to the OS), so gathers write into buffers kept here.
    """

    def __init__(self) -> None:
        self.bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, int(1.25 * (buf.numel() if buf is not None else 0))),
                              dtype=dtype, device=device)
            self.bufs[key] = buf
        return buf[:numel]


_scratch = _Scratch()


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[T, KVH, D]`` into their slots; slot -1 marks a token not to store."""
    if key.shape[0] == 0:
        return
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    slots = slot_mapping.to(device=k_cache.device, dtype=torch.long)
    valid = slots >= 0
    if not bool(valid.all()):
        key, value, slots = key[valid], value[valid], slots[valid]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value.to(v_cache.dtype))


def gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int, name: str = "kv"
) -> torch.Tensor:
    """``[S, KVH, L, D]`` view of a copy of the first ``num_tokens`` (rounded up to a block) of each table.

    The copy lives in a per-thread scratch buffer named ``name``: it is valid until the next gather
    under the same name in this thread.
    """
    block_size = cache.shape[1]
    nblocks = -(-num_tokens // block_size)
    idx = block_tables[:, :nblocks].to(device=cache.device, dtype=torch.long).clamp(min=0).reshape(-1)
    row = cache[0].numel()
    flat = _scratch.get(name, idx.numel() * row, cache.dtype, cache.device).view(idx.numel(), row)
    torch.index_select(cache.view(cache.shape[0], row), 0, idx, out=flat)
    kv = flat.view(block_tables.shape[0], nblocks, block_size, cache.shape[2], cache.shape[3])
    if kv.dtype in (torch.float16, torch.bfloat16):
        # Slots past a sequence's end hold whatever an earlier owner of the block left; an fp16
        # overflow there (inf) would turn masked-out weights into NaN (0 * inf).
        torch.nan_to_num_(kv, nan=0.0, posinf=0.0, neginf=0.0)
    s = kv.shape[0]
    return kv.view(s, nblocks * block_size, cache.shape[2], cache.shape[3]).transpose(1, 2)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """q ``[n, H, Lq, D]``, k/v ``[n, KVH, Lk, D]``, boolean mask ``[n, 1, Lq, Lk]`` -> ``[n, H, Lq, D]``."""
    if softcap is None or softcap == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    # SDPA has no logit soft-capping: explicit scores, grouped so KV heads are never repeated.
    n, num_heads, lq, d = q.shape
    kvh = k.shape[1]
    g = num_heads // kvh
    qg = q.reshape(n, kvh, g * lq, d)
    scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(n, kvh, g, lq, -1).masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(n, kvh, g * lq, -1)
    out = torch.matmul(probs, v.float())
    return out.view(n, num_heads, lq, d).to(q.dtype)


def _key_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, seq_len: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """Allowed (query, key) pairs; positions are absolute within each sequence."""
    mask = (k_pos <= q_pos) & (k_pos < seq_len)
    if sliding_window is not None and sliding_window > 0:
        mask &= k_pos > q_pos - sliding_window
    return mask


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    decode_rows=None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of packed queries ``[T, H, D]`` over paged K/V. Returns ``[T, H, D]``.

    Tokens past ``cu_seqlens_q[-1]`` (padding rows) get zeros. ``decode_rows(out, rows)``, if given,
    computes the rows of the sequences with one query (``rows``: their indices) into ``out`` instead
    of the gather + SDPA path here (the compiled CPU backend passes its kernel). ``new_kv``: this step's
    own keys and values ``[T, KVH, D]``, packed like the queries; a prompt with no cached context
    (``seq_len == q_len``) then attends over its slice of them, without gathering its blocks or building a
    mask (the common case of a step that mixes decodes and new prompts).
    """
    out = torch.zeros_like(query)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    # fp16 attention on CPU is slow and not always supported: compute in fp32 there.
    work_dtype = torch.float32 if (query.device.type == "cpu" and query.dtype == torch.float16) else None
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    q_lens = [cu[i + 1] - cu[i] for i in range(num_seqs)]
    decode = [i for i in range(num_seqs) if q_lens[i] == 1 and lens[i] > 0]
    prefill = [i for i in range(num_seqs) if q_lens[i] > 1]
    device = query.device
    if decode and decode_rows is not None:
        decode_rows(out, decode)
    elif decode:
        for group in _length_groups(decode, lens):
            _decode(query, k_cache, v_cache, block_tables, cu, lens, group, out,
                    scale, sliding_window, softcap, work_dtype)
    if prefill and new_kv is not None and not softcap:
        fresh = [i for i in prefill if lens[i] == q_lens[i]]
        for i in fresh:
            s, e = cu[i], cu[i + 1]
            out[s:e] = causal_sdpa(query[s:e], new_kv[0][s:e], new_kv[1][s:e], scale, sliding_window)
        if fresh:
            prefill = [i for i in prefill if lens[i] != q_lens[i]]
    if prefill:
        real = sum(q_lens[i] * lens[i] for i in prefill)
        padded = len(prefill) * max(q_lens[i] for i in prefill) * max(lens[i] for i in prefill)
        groups = [prefill] if padded <= _PAD_WASTE_LIMIT * real else [[i] for i in prefill]
        for group in groups:
            if len(group) == 1 and not softcap and not (sliding_window and sliding_window > 0):
                i = group[0]
                _prefill_row(query, k_cache, v_cache, block_tables[i], cu[i], cu[i + 1], lens[i], out, scale,
                             work_dtype)
            else:
                _prefill(query, k_cache, v_cache, block_tables, cu, lens, q_lens, group, out,
                         scale, sliding_window, softcap, work_dtype, device)
    return out


def _length_groups(rows: list[int], lens: list[int]) -> list[list[int]]:
    """Split rows, longest first, into groups whose shortest row is within _DECODE_LEN_RATIO of the longest."""
    groups: list[list[int]] = []
    limit = 0.0
    for i in sorted(rows, key=lens.__getitem__, reverse=True):
        if not groups or lens[i] < limit:
            groups.append([])
            limit = lens[i] / _DECODE_LEN_RATIO
        groups[-1].append(i)
    return groups


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def _decode(query, k_cache, v_cache, block_tables, cu, lens, rows, out,
            scale, sliding_window, softcap, work_dtype) -> None:
    device = query.device
    rows_t = torch.tensor(rows, device=device)
    tok = torch.tensor([cu[i] for i in rows], device=device)
    seq = torch.tensor([lens[i] for i in rows], device=device)
    max_k = max(lens[i] for i in rows)
    tables = block_tables.index_select(0, rows_t.to(block_tables.device))
    k = _cast(gather_kv(k_cache, tables, max_k, "k"), work_dtype)
    v = _cast(gather_kv(v_cache, tables, max_k, "v"), work_dtype)
    k_pos = torch.arange(k.shape[2], device=device)
    mask = _key_mask((seq - 1)[:, None], k_pos[None, :], seq[:, None], sliding_window)
    q = _cast(query.index_select(0, tok), work_dtype).unsqueeze(2)  # [n, H, 1, D]
    res = _attend(q, k.to(device), v.to(device), mask[:, None, None, :], scale, softcap)
    out.index_copy_(0, tok, res.squeeze(2).to(out.dtype))


def _prefill_row(query, k_cache, v_cache, table, start, end, seq_len, out, scale, work_dtype) -> None:
    """One prompt chunk (queries ``start:end``, the last of its ``seq_len`` tokens) over exactly its tokens'
    K/V, gathered from its blocks: nothing past its end is read (so no NaN clean-up), and the mask is one
    comparison (query ``i`` sees keys ``j <= context + i``)."""
    block_size, kvh, dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    idx = table[: -(-seq_len // block_size)].to(device=k_cache.device, dtype=torch.long)
    k = k_cache.index_select(0, idx).view(-1, kvh, dim)[:seq_len].to(query.device)
    v = v_cache.index_select(0, idx).view(-1, kvh, dim)[:seq_len].to(query.device)
    pos = _positions(seq_len, query.device)
    mask = pos[None, :] <= pos[seq_len - (end - start):, None]
    q, k, v = (_cast(t.transpose(0, 1), work_dtype)[None] for t in (query[start:end], k, v))
    res = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    out[start:end] = res[0].transpose(0, 1).to(out.dtype)


def _positions(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` from a per-thread buffer (grown as needed)."""
    key = ("positions", torch.int64, device)
    buf = _scratch.bufs.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.arange(max(n, 1024, 2 * (buf.numel() if buf is not None else 0)), device=device)
        _scratch.bufs[key] = buf
    return buf[:n]


def _prefill(query, k_cache, v_cache, block_tables, cu, lens, q_lens, rows, out,
             scale, sliding_window, softcap, work_dtype, device) -> None:
    n = len(rows)
    max_q = max(q_lens[i] for i in rows)
    max_k = max(lens[i] for i in rows)
    # Flat source token index of each real query and its destination in the padded [n, max_q] grid.
    src = torch.cat([torch.arange(cu[i], cu[i + 1], device=device) for i in rows])
    dst = torch.cat([torch.arange(q_lens[i], device=device) + j * max_q for j, i in enumerate(rows)])
    num_heads, head_dim = query.shape[1], query.shape[2]
    q = query.new_zeros(n * max_q, num_heads, head_dim, dtype=work_dtype or query.dtype)
    q.index_copy_(0, dst, _cast(query.index_select(0, src), work_dtype))
    q = q.view(n, max_q, num_heads, head_dim).transpose(1, 2)
    tables = block_tables.index_select(0, torch.tensor(rows, device=block_tables.device))
    k = _cast(gather_kv(k_cache, tables, max_k, "k"), work_dtype).to(device)
    v = _cast(gather_kv(v_cache, tables, max_k, "v"), work_dtype).to(device)
    seq = torch.tensor([lens[i] for i in rows], device=device)[:, None, None]
    qlen = torch.tensor([q_lens[i] for i in rows], device=device)[:, None, None]
    q_idx = torch.arange(max_q, device=device)[None, :, None]
    k_pos = torch.arange(k.shape[2], device=device)[None, None, :]
    mask = _key_mask(seq - qlen + q_idx, k_pos, seq, sliding_window)
    # Padded query rows would see no key at all (softmax of all -inf is NaN): let them see key 0.
    mask |= (q_idx >= qlen) & (k_pos == 0)
    res = _attend(q, k, v, mask[:, None], scale, softcap)  # [n, H, max_q, D]
    res = res.transpose(1, 2).reshape(n * max_q, num_heads, head_dim)
    out.index_copy_(0, src, res.index_select(0, dst).to(out.dtype))


def lora_add(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ranks: list[int],
             scales: list[float], segments: list[tuple[int, int, int]]) -> None:
    """In place: ``out[s:e] += (x[s:e] @ a[slot, :r].T) @ b[slot, :, :r].T * scale`` for each segment
    ``(s, e, slot)`` whose slot has a rank ``r > 0`` in this layer (the order of PEFT's LoRA forward).

    ``x [T, K]``, ``out [T, N]``, ``a [S, R, K]``, ``b [S, N, R]`` (ranks zero-padded to ``R``). On CPU this
    is also the fast path: one pair of matmuls per adapter segment, and nothing for base-model rows.
    """
    for start, end, slot in segments:
        r = ranks[slot]
        if r == 0 or end <= start:
            continue
        v = x[start:end] @ a[slot, :r].T
        out[start:end].addmm_(v, b[slot, :, :r].T, alpha=scales[slot])

