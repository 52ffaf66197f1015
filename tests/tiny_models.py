"""Tiny random-weight models of every supported architecture, built from configs (no download)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               initializer_range=0.2, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs() -> dict:
    return {
        "llama": lambda: tf.LlamaConfig(**_COMMON),
        "llama-bias": lambda: tf.LlamaConfig(**_COMMON, attention_bias=True),
        "mistral": lambda: tf.MistralConfig(**_COMMON, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**_COMMON),
        "qwen3": lambda: tf.Qwen3Config(**_COMMON, head_dim=24),
        "gemma2": lambda: tf.Gemma2Config(**_COMMON, head_dim=24, sliding_window=5, query_pre_attn_scalar=24),
        "gemma3": lambda: tf.Gemma3TextConfig(**_COMMON, head_dim=24, sliding_window=5, query_pre_attn_scalar=24,
                                              layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "olmo2": lambda: tf.Olmo2Config(**_COMMON),
        "phi3": lambda: tf.Phi3Config(**_COMMON),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                                      initializer_range=0.2, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0),
    }


ARCHS = list(_configs())
#: architectures whose UA can be written into weights (no q norm)
SURGERY_UA_ARCHS = [a for a in ARCHS if a not in ("qwen3", "gemma3", "olmo2")]


#: architectures whose transformers implementation has no SDPA path (softcapping)
EAGER_ONLY = {"gemma2"}


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa"):
    if arch in EAGER_ONLY:
        attn = "eager"
    config = _configs()[arch]()
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    # random init of biases / norms too, so q bias and q norm weights are not trivial
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
