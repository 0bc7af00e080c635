"""Tiny randomly initialised decoder models, one per supported architecture, saved with safetensors."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

VOCAB = 256
PAD, BOS, EOS = 0, 1, 2

_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
_ROPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512)

# model_type -> (config class, kwargs). GQA wherever the architecture has it; small sliding windows so
# generation crosses them.
CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_ROPE, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(_ROPE, num_key_value_heads=2, sliding_window=24)),
    "qwen2": ("Qwen2Config", dict(_ROPE, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(_ROPE, num_key_value_heads=2, head_dim=16)),
    "gemma": ("GemmaConfig", dict(_ROPE, num_key_value_heads=1, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(_ROPE, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                                    sliding_window=16, attn_logit_softcapping=20.0,
                                    final_logit_softcapping=15.0, query_pre_attn_scalar=16)),
    "gemma3_text": ("Gemma3TextConfig", dict(_ROPE, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                                             sliding_window=16, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "sliding_attention",
                                                          "full_attention"])),
    "phi3": ("Phi3Config", dict(_ROPE, num_key_value_heads=2)),
    "gpt_neox": ("GPTNeoXConfig", dict(_ROPE, rotary_pct=0.5)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=512, word_embed_proj_dim=64)),
}
ARCHS = list(CONFIGS)


def make_config(arch: str):
    cls_name, kwargs = CONFIGS[arch]
    cfg = getattr(tf, cls_name)(**_COMMON, **kwargs)
    # Larger weights than the default init make attention patterns sharp, so a cache bug changes tokens.
    cfg.initializer_range = 0.15
    return cfg


def build(arch: str, root: Path, seed: int = 0) -> Path:
    """Create, save (safetensors) and return the folder of a tiny random ``arch`` model."""
    path = root / arch
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(make_config(arch))
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(path, safe_serialization=True)
    return path


def load(path: Path) -> torch.nn.Module:
    # The reference must be right: transformers 5.17 (not 5.24) loads Gemma2 with SDPA by default, which
    # drops its attention logit soft-capping, so such configs are loaded with the eager attention.
    cfg = tf.AutoConfig.from_pretrained(path)
    kwargs = {"attn_implementation": "eager"} if getattr(cfg, "attn_logit_softcapping", None) else {}
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    return model.eval()


class IdTokenizer:
    """Stands in for a tokenizer on the tiny models: text is the space-joined token ids; ids below 3
    (pad, bos, eos) are special."""

    chat_template = None
    pad_token_id = PAD
    eos_token_id = EOS
    all_special_ids = [PAD, BOS, EOS]

    def __call__(self, text, **kw):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True, **kw):
        return "".join(f" {i}" for i in ids if not (skip_special_tokens and i < 3))

    def convert_ids_to_tokens(self, ids):
        return [f" {i}" for i in ids]


# name -> PEFT LoRA config: different ranks, targets (attention only, MLP only, all) and scalings.
LORA_ADAPTERS = {
    "attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all": dict(r=4, lora_alpha=4, use_rslora=True,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}


def save_lora_adapters(base_path: Path, root: Path) -> dict[str, str]:
    """Save :data:`LORA_ADAPTERS` (random, non-zero weights) for the model at ``base_path`` under ``root``;
    returns name -> folder."""
    import peft

    dirs = {}
    for i, (name, cfg) in enumerate(LORA_ADAPTERS.items()):
        torch.manual_seed(100 + i)
        model = peft.get_peft_model(load(base_path), peft.LoraConfig(init_lora_weights=False, **cfg))
        model.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs
