"""What tests/engine_fuzz.py runs on besides the tiny models (a tiny Llama with LoRA adapters, one with the default
model's tokenizer), and its checks against plain models: HF ``generate()`` parity and the replay that tells a
rounding flip from a bug."""
from __future__ import annotations

from pathlib import Path

import torch

import hf_paged
from tiny_models import load

PEAK = 30.0  # chat_model()'s output layer, scaled

FLIP_NOISE = 1e-5  # the logits differ by ~1e-6 between batch shapes (5e-6 over a 49152-token vocabulary)
FLIP_TRIES = 24
# Independent noise barely moves a dense row's CDF far from its ends (it averages out), but rounding that
# differs between batch shapes is correlated. So the logits up to the lower of the two tokens are also
# raised or lowered together, by up to FLIP_TILT of their largest magnitude: that moves the CDF between the
# two by up to ~c(1 - c) * FLIP_TILT * max|logit| / T (~1e-6 at T 1.3). Seeded draws 3e-8 to 3e-7 from a
# boundary, over tokens of p ~1e-7, were missed without it. Of 291 made-up pairs (the drawn token and its
# neighbours at -1, +1 and +7), 1 passes: a neighbour at -1 in such a region of a dense row.
FLIP_TILT = 3e-7
FLIP_TILTS = 12


@torch.no_grad()
def rounding_flip(model, req: tuple[list[int], dict], index: int, prefix: list[int], a: int, b: int) -> bool:
    """Whether continuation ``index`` of ``req``, after ``prefix``, draws ``a`` or ``b`` depending on float
    rounding alone: its next-token logits, recomputed with the plain model (no engine) and nudged by noise of
    ``FLIP_NOISE`` or shifted below the two by up to ``FLIP_TILT``, give both tokens among the draws by the
    sampler with the sequence's own uniform for that step. A draw near a boundary of the CDF, a near-tie of
    greedy scores, and a truncation (top-p, typical, min-p) decided by a hair all are. A real difference is not:
    noise that small leaves it alone."""
    from hf_paged.engine.params import SamplingParams
    from hf_paged.engine.sampler import Sampler, SamplingRow

    ids, kw = req
    if any(k in kw for k in ("regex", "choices", "json_schema")):
        return False  # the draw would need the grammar's mask: such a difference is reported, to be looked at
    if isinstance(model, LoraTarget):
        model = model.plain(kw.get("adapter"))
    kw = {k: v for k, v in kw.items() if k not in ("stop", "adapter")}
    params = SamplingParams.from_request(model.generation_config, **kw)  # as the pipeline makes them
    logits = model(torch.tensor([ids + prefix])).logits[0, -1:].float()
    sampler = Sampler(model.config.vocab_size)
    noise = torch.Generator().manual_seed(len(prefix))
    scale = logits.abs().max()
    step = torch.zeros(logits.shape[-1])
    step[: min(a, b) + 1] = 1.0

    def draw(nudged: torch.Tensor) -> int:
        gen = None
        if params.do_sample:
            gen = torch.Generator().manual_seed(params.seed + index)
            torch.rand(len(prefix), dtype=torch.float64, generator=gen)  # one uniform a step before this one
        return sampler.sample(nudged, [SamplingRow(params, ids + prefix, len(prefix), gen)]).tokens[0]

    def shifted(x: float) -> int:
        return draw(logits + FLIP_TILT * x * scale * step)

    seen = set()
    for t in range(FLIP_TRIES):
        seen.add(draw(logits + FLIP_NOISE * (t > 0) * torch.randn(logits.shape, generator=noise) * scale))
        if a in seen and b in seen:
            return True
    # Shifts of -FLIP_TILT .. +FLIP_TILT in even steps. Where the picks move one way only (a draw over the row in
    # token order: dense or truncated, not TopK's candidates), every token between them is within reach: one of
    # p 3e-9 is a CDF window of at most one float32 step, which a shift may skip and rounding may not.
    # Sampled rows only, and only tokens the row can draw at all: a greedy pick is the top score of the tokens
    # on one side of the shift or the other, and a token a warper or processor removed has no CDF window.
    picks = [shifted(2 * k / (FLIP_TILTS - 1) - 1) for k in range(FLIP_TILTS)]
    seen.update(picks)
    if params.do_sample and (all(p >= q for p, q in zip(picks, picks[1:]))
                             or all(p <= q for p, q in zip(picks, picks[1:]))):
        scores = sampler.process(logits, [SamplingRow(params, ids + prefix, len(prefix))])[0]
        if bool(torch.isfinite(scores[[a, b]]).all()) and min(picks) <= min(a, b) and max(a, b) <= max(picks):
            return True
    return a in seen and b in seen


@torch.no_grad()
def hf_parity(model, reqs, ref: list, flips: list | None = None) -> list[str]:
    """The reference run's greedy requests against HF ``generate()`` on the plain model, one at a time: the same
    tokens (up to a near-tie, :func:`rounding_flip`), and where asked, logprobs equal to ``log_softmax`` of
    ``generate()``'s processed scores. Requests with what ``generate()`` lacks (OpenAI's frequency and presence
    penalties, stop strings, ignore_eos, constraints) are left out."""
    problems = []
    for i, ((ids, kw), outs) in enumerate(zip(reqs, ref)):
        if kw.get("do_sample") or kw.get("frequency_penalty") or kw.get("presence_penalty") or kw.get("stop") \
                or kw.get("ignore_eos") or any(k in kw for k in ("regex", "choices", "json_schema")):
            continue
        plain = model.plain(kw.get("adapter")) if isinstance(model, LoraTarget) else model
        gen = plain.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=kw["max_new_tokens"], do_sample=False, pad_token_id=0,
                             repetition_penalty=kw.get("repetition_penalty"), min_new_tokens=kw.get("min_new_tokens"),
                             no_repeat_ngram_size=kw.get("no_repeat_ngram_size"), output_scores=True,
                             return_dict_in_generate=True)
        want = gen.sequences[0, len(ids):].tolist()
        got, logprobs = outs[0][0], outs[0][3]
        k = next((t for t, (x, y) in enumerate(zip(got, want)) if x != y), None)
        if k is not None:
            if rounding_flip(model, (ids, kw), 0, got[:k], got[k], want[k]):
                if flips is not None:
                    flips.append(f"generate(): request {i} token {k}: {got[k]} vs {want[k]}")
                continue
            problems.append(f"request {i} {kw} prompt {len(ids)}: differs from generate() at token {k}: "
                            f"{got[k:k + 4]} vs {want[k:k + 4]}")
            continue
        if got != want:
            problems.append(f"request {i} {kw}: {len(got)} tokens, generate() made {len(want)}")
            continue
        if logprobs is not None:
            hf = [torch.log_softmax(sc[0].float(), -1)[t].item() for sc, t in zip(gen.scores, want)]
            if any(abs(a - b) > 1e-3 for a, b in zip(logprobs, hf) if a > -9999):
                problems.append(f"request {i}: logprobs {logprobs[:4]} vs generate()'s {hf[:4]}")
    return problems


class LoraTarget:
    """A tiny Llama and tiny_models.LORA_ADAPTERS (other ranks, targets and scalings, as tests/test_lora.py
    uses them), for scenarios whose requests pick an adapter each (batched LoRA)."""

    def __init__(self, root: Path) -> None:
        from tiny_models import build, save_lora_adapters

        self.base_path = build("llama", root)
        self.dirs = save_lora_adapters(self.base_path, root)
        self._plain: dict = {}

    def plain(self, adapter: str | None):
        """The model with ``adapter`` applied by PEFT (no engine), for replaying a draw."""
        if adapter not in self._plain:
            import peft

            model = load(self.base_path)
            self._plain[adapter] = model if adapter is None else \
                peft.PeftModel.from_pretrained(model, self.dirs[adapter]).eval()
        return self._plain[adapter]


def chat_model():
    """A 2-layer random Llama with the default model's tokenizer (tests/served.py), and that tokenizer."""
    from served import tiny_chat_pipeline

    pipe = tiny_chat_pipeline(max_model_len=256)
    model, tok = pipe.model, pipe.tokenizer
    pipe.close()
    hf_paged.unwrap(model)
    # Peaked next-token distributions, as a trained model's are: the random model's are near-uniform over 49152
    # tokens. Batch shapes change the logits' float rounding (~5e-6 here), and over a near-uniform row that
    # moves a seeded draw to another token every few hundred draws; peaked rows, sampled among TopK
    # candidates, make that rare, so a difference points at a bug.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(PEAK)
    return model, tok
