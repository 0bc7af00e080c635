"""GreedyHead: on CPU, the LM head and the greedy pick fused for decode steps with many rows.

A step's logits are ``[rows, vocab]`` float32: 50 MB at 256 rows of a 49152-token vocabulary. Made whole,
that block is written out by the LM head's matmul (a fresh allocation of that size is page-faulted in
every step) and read again by the argmax. When every row of a step is plain greedy (no log-probabilities,
penalties, grammar or sampling), the head runs the decoder only, then the output layer over vocabulary
tiles of ``TILE`` ids: each tile's logits, a few MB, are folded into each row's running maximum at once
(``hf_paged_cpu::argmax_update``), while the output weights are still streamed once. The tokens are those of
the whole-logits argmax (first maximum, first NaN); the logits themselves are never seen by anyone.

Measured on this project's 2-core CPU (docs/benchmarks.md): at 256 rows the LM head plus argmax ran in
roughly 0.5-0.9x the time of the whole-logits path (a 64-wide toy model, and 576-wide in fp32 and bf16),
while at 64 rows (12.5 MB of logits) tiling was no faster or slower. Hence ``MIN_LOGITS``: the fused path
runs from that many logits (rows x vocab) on, which is 171 rows for a 49152-token vocabulary.

Only for models whose logits are exactly ``lm_head(decoder(...))``: the tested architectures, without a
final logit soft-cap or scale. ``HF_PAGED_FUSED_HEAD=0`` turns it off.

Example::

    head = GreedyHead.for_model(model)        # None where it does not apply
    if head is not None and head.wanted(rows):
        tokens = head.tokens(hidden)          # [rows] int64
"""
from __future__ import annotations

import os

import torch

from ..kernels import cpu

TILE = 4096  # vocabulary ids per tile: [256, 4096] float32 logits are 4 MB, in the last-level cache
MIN_LOGITS = 1 << 23  # rows x vocab from which the fused path runs (32 MiB of float32 logits)


class GreedyHead:
    def __init__(self, model: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Linear, vocab: int) -> None:
        self.model = model
        self.decoder = decoder
        self.head = head
        self.vocab = vocab
        # The call the rerouted nn.Linear makes for many rows (kernels/cpu_layers.py), on weight slices.
        self._onednn = bool(getattr(head, "_hf_paged_onednn", False))

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "GreedyHead | None":
        """The fused head of ``model``, or None: off, not on CPU, no C++ kernels, or a model whose logits
        are not plainly its output layer applied to its decoder's last hidden states."""
        from ..wrap import SUPPORTED_MODEL_TYPES

        if os.environ.get("HF_PAGED_FUSED_HEAD", "1").strip() == "0":
            return None
        cfg = model.config
        head = model.get_output_embeddings()
        decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if (cfg.model_type not in SUPPORTED_MODEL_TYPES or type(head) is not torch.nn.Linear
                or not isinstance(decoder, torch.nn.Module) or decoder is model):
            return None
        # Anything applied to the logits after the head (Gemma2's soft-cap, a logit scale) is left to the
        # ordinary path, even where monotonic: rounding may tie two logits there that differ before it.
        if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logit_scale",
                                                                      "logits_scaling")):
            return None
        w = head.weight
        if type(w) is not torch.nn.Parameter or w.device.type != "cpu" or w.dtype not in (torch.float32,
                                                                                          torch.bfloat16):
            return None
        if not cpu.available():
            return None
        return cls(model, decoder, head, min(cfg.vocab_size, w.shape[0]))

    def wanted(self, rows: int) -> bool:
        return rows * self.vocab >= MIN_LOGITS

    @torch.inference_mode()
    def tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy token of each row of ``hidden`` ``[rows, hidden_size]``: argmax of ``head(hidden)``
        over the first ``vocab`` ids (as the sampler, which cuts a padded head to the vocabulary)."""
        rows = hidden.shape[0]
        w, b = self.head.weight, self.head.bias
        x = hidden.to(w.dtype).contiguous()
        best_val = torch.full((rows,), -float("inf"))
        best_idx = torch.zeros(rows, dtype=torch.long)
        for v0 in range(0, self.vocab, TILE):
            v1 = min(v0 + TILE, self.vocab)
            bias = None if b is None else b[v0:v1]
            if self._onednn:
                tile = torch.ops.mkldnn._linear_pointwise(x, w[v0:v1], bias, "none", [], "")
            else:
                tile = torch.nn.functional.linear(x, w[v0:v1], bias)
            cpu.argmax_update(tile, v0, best_val, best_idx)
        return best_idx
