"""Tiny random-weight models of every supported architecture, built from configs (no download).

Equivalence tests run these models in float64 (``tiny_model(arch, dtype=torch.float64)``), so that two
computations of the same thing agree to float64 rounding (~1e-15 relative) on any CPU and any thread
count, and a tolerance of 1e-10 relative can be asserted. That needs :func:`float64_model`:
transformers computes RMS norms and the eager attention softmax in float32 even in a float64 model
(``hidden.to(torch.float32)`` …), which would round every layer's state to float32 — two float64
computations that differ by 1e-16 then occasionally round to neighbouring float32 values, and differ
by ~1e-7.
"""

from __future__ import annotations

import torch
import transformers as tf
from torch.overrides import TorchFunctionMode

VOCAB = 96

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               initializer_range=0.2, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs() -> dict:
    return {
        "llama": lambda: tf.LlamaConfig(**_COMMON),
        "llama-bias": lambda: tf.LlamaConfig(**_COMMON, attention_bias=True),
        # a window shorter than the tests' sequences (6-12 tokens), so mistral is not llama again
        "mistral": lambda: tf.MistralConfig(**_COMMON, sliding_window=4),
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


class _NoNarrowing(TorchFunctionMode):
    """Inside: a float64 tensor is never narrowed to float32 (``.float()``, ``.to(torch.float32)``,
    ``softmax(..., dtype=torch.float32)`` keep float64); everything else runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
            if func is torch.Tensor.float:
                return x
            if func is torch.Tensor.to:
                args = tuple(torch.float64 if a is torch.float32 else a for a in args)
                if kwargs.get("dtype") is torch.float32:
                    kwargs["dtype"] = torch.float64
            elif kwargs.get("dtype") is torch.float32:  # softmax(x, dim, dtype=torch.float32) and the like
                kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


_F64_CLASSES: dict[type, type] = {}


def _float64_class(cls: type) -> type:
    """A subclass of ``cls`` (same name) whose forward runs under :class:`_NoNarrowing`."""
    if cls not in _F64_CLASSES:
        def forward(self, *args, **kwargs):
            with _NoNarrowing():
                return cls.forward(self, *args, **kwargs)

        _F64_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _F64_CLASSES[cls]


def float64_model(model):
    """``model`` converted to float64 *end to end*, in place (returned for chaining).

    Besides ``model.double()``, the norm and attention modules get a subclass whose forward keeps
    float64 where transformers would upcast to float32 (RMSNorm, the eager softmax; rotary angles stay
    float32-computed constants, identical in every computation). No hooks and no instance attributes
    are added, so the engine's "no hook left behind" checks see a plain model.
    """
    model.to(torch.float64)
    for module in model.modules():
        name = type(module).__name__
        if name.endswith(("RMSNorm", "Attention")) and type(module) not in _F64_CLASSES.values():
            module.__class__ = _float64_class(type(module))
    return model


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    """The tiny random model of ``arch`` (3 layers × 4 query heads, 2 kv heads, d_model 64) in ``dtype``.

    The same weights for the same seed in every dtype (initialised in float32, then converted);
    float64 is what the equivalence tests use, so that their tolerance sits at float64 noise.
    """
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
    if dtype == torch.float64:
        return float64_model(model).eval()
    return model.to(dtype).eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
